"""Models found for the commands: an unusable model gives one line on stderr, exit code 2, no traceback and no
output folder; which models are decoders."""

from __future__ import annotations

import os
import pathlib

from .cli_support import bad_input, finetune_argv


def test_unknown_model_folder(capsys, good_csv, tmp_path):
    out = tmp_path / "out"
    bad_input(capsys, finetune_argv(tmp_path / "no-such-model", good_csv, out), out, "model folder not found")


def test_unknown_hub_model_offline(capsys, good_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    bad_input(capsys, finetune_argv("nobody-has/this-model-xyz", good_csv, out), out,
              "unknown model 'nobody-has/this-model-xyz': not a local folder and not in the Hugging Face cache")


def test_a_folder_that_is_not_a_model(capsys, good_csv, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    bad_input(capsys, finetune_argv(tmp_path / "empty", good_csv, out), out, "has no config.json")


def test_a_model_folder_with_broken_weights(capsys, bert, good_csv, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(bert):
        (broken / name).write_bytes(pathlib.Path(bert, name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "out"
    bad_input(capsys, finetune_argv(broken, good_csv, out), out, "could not load model")


def test_a_text_file_with_an_encoder_model(capsys, bert, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("cat dog " * 200)
    out = tmp_path / "out"
    bad_input(capsys, finetune_argv(bert, path, out), out, "is an encoder (bert)")


def test_decoders_are_told_from_the_config_and_transformers_own_classes():
    from transformers import BertConfig, GPT2Config, LlamaConfig

    from spectral_peft.tools.models import is_decoder

    # no saved architecture: a causal-LM type without a masked-LM class is a decoder; BERT has both, so it is not
    assert is_decoder(GPT2Config()) and is_decoder(LlamaConfig())
    assert not is_decoder(BertConfig())
    assert is_decoder(BertConfig(is_decoder=True))
    assert is_decoder(BertConfig(architectures=["BertLMHeadModel"]))
    assert is_decoder(LlamaConfig(architectures=["LlamaForSequenceClassification"]))


# the model types a hand-written list used to mark as decoders: the rule above finds every one of them
FORMER_DECODER_LIST = (
    "gpt2", "gptj", "gpt_neo", "gpt_neox", "gpt_bigcode", "llama", "mistral", "mixtral", "qwen2", "qwen2_moe",
    "qwen3", "qwen3_moe", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "opt", "bloom", "falcon", "mpt", "olmo",
    "olmo2", "starcoder2", "codegen", "stablelm", "smollm3", "granite", "cohere", "ctrl", "xglm", "biogpt",
)


def test_every_model_type_of_the_former_decoder_list_is_a_decoder():
    from transformers import CONFIG_MAPPING

    from spectral_peft.tools.models import is_decoder

    known = [t for t in FORMER_DECODER_LIST if t in CONFIG_MAPPING]  # as this transformers version has them
    assert len(known) > 20
    assert [t for t in known if not is_decoder(CONFIG_MAPPING[t]())] == []
