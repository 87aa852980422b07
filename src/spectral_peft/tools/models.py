"""The one model loader of the commands: find a model (the offline MiniLM, a local folder or a hub id), its
tokenizer (or image processor) and the transformers model for a task, offline first; the classification head's name
and the default target modules."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from dataclasses import dataclass
from typing import Optional

from spectral_peft_cli.inputs import check_model_folder

from .errors import UsageError, first_line
from .tasks import CLASSIFICATION, IMAGE_CLASSIFICATION, LANGUAGE_MODELING, Task

# the classification head's module name: BERT-likes call it classifier, decoders score
HEAD_NAMES = ("classifier", "score")


@dataclass
class ModelInfo:
    arg: Optional[str]  # what the user gave (None: the default offline MiniLM)
    path: str  # folder or hub id for from_pretrained
    config: object
    decoder: bool
    local_only: bool  # whether from_pretrained should stay offline
    image: bool = False  # an image classifier (ViT and the like)

    @property
    def display(self) -> str:
        return self.arg if self.arg is not None else f"all-MiniLM-L6-v2 (offline, {self.path})"

    @property
    def name(self) -> str:
        """The model as error messages name it."""
        return self.arg or self.path

    def saved_in(self, folder: pathlib.Path) -> "ModelInfo":
        """The same kind of model, saved whole in a local ``folder`` (a full fine-tuning run's output)."""
        return dataclasses.replace(self, arg=str(folder), path=str(folder), config=None, local_only=True)


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def from_pretrained(loader, path: str, local_only: bool, **kwargs):
    """Offline first: the local folder or cache; the hub only where it is allowed and the cache has nothing.
    Returns what ``loader`` gave and whether it was found locally."""
    try:
        return loader(path, local_files_only=True, **kwargs), True
    except (OSError, ValueError):
        if local_only or offline():
            raise
    return loader(path, **kwargs), False


def _where(name: Optional[str]) -> tuple[str, bool]:
    """The folder or hub id of a model name, and whether it is local; checks a local folder is a model's."""
    if name is None:
        from .data import default_model_path

        try:
            return default_model_path(), True
        except FileNotFoundError as error:
            raise UsageError(str(error)) from None
    check_model_folder(name)
    candidate = pathlib.Path(name).expanduser()
    if candidate.exists():
        return str(candidate.resolve()), True
    return name, False


def resolve_model(name: Optional[str]) -> ModelInfo:
    """Find a model's config (no weights loaded): the default MiniLM, a local folder, or a hub id."""
    from transformers import AutoConfig

    path, local = _where(name)
    try:
        config, found_locally = from_pretrained(AutoConfig.from_pretrained, path, local)
    except (OSError, ValueError, KeyError) as error:
        if local:
            raise UsageError(f"could not read the model config in '{path}': {first_line(error)}") from None
        if offline():
            raise UsageError(
                f"unknown model '{name}': not a local folder and not in the Hugging Face cache (offline: "
                "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)"
            ) from None
        raise UsageError(f"could not load model '{name}': {first_line(error)}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(f"model '{name or path}' is an encoder-decoder ({config.model_type}); only encoder models "
                         "(sequence classification) and decoder models (language modelling) are supported")
    return ModelInfo(arg=name, path=path, config=config, decoder=is_decoder(config),
                     local_only=local or found_locally, image=is_image_classifier(config))


def is_image_classifier(config) -> bool:
    """Whether transformers has an image-classification class for the model's type (ViT, DeiT, BEiT, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    return (getattr(config, "model_type", None) in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
            or any(a.endswith("ForImageClassification") for a in architectures))


def is_decoder(config) -> bool:
    """Whether a (not encoder-decoder) model generates text: its config says so, its saved class is a causal LM,
    or transformers has a causal-LM class and no masked-LM class for its type (GPT-2, Llama, ...; BERT-likes have
    both)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    architectures = getattr(config, "architectures", None) or []
    model_type = getattr(config, "model_type", None)
    return bool(
        getattr(config, "is_decoder", False)
        or any(a.endswith(("CausalLM", "LMHeadModel")) for a in architectures)
        or (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    )


def load_tokenizer(info: ModelInfo):
    from transformers import AutoTokenizer

    try:
        tokenizer, _ = from_pretrained(AutoTokenizer.from_pretrained, info.path, info.local_only)
    except Exception as error:  # noqa: BLE001  (tokenizer loading raises many kinds; all mean "unusable model")
        raise UsageError(f"could not load the tokenizer of model '{info.name}': {first_line(error)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"the tokenizer of model '{info.name}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_processor(info: ModelInfo, task_kind: str):
    """What prepares the task's inputs for the model: its image processor for images, else its tokenizer."""
    if task_kind != IMAGE_CLASSIFICATION:
        return load_tokenizer(info)
    from transformers import AutoImageProcessor

    try:
        processor, _ = from_pretrained(AutoImageProcessor.from_pretrained, info.path, info.local_only)
    except Exception as error:  # noqa: BLE001  (as for tokenizers: every failure means "unusable model")
        raise UsageError(f"could not load the image processor of model '{info.name}' (its "
                         f"preprocessor_config.json): {first_line(error)}") from None
    return processor


def _auto_class(task_kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

    return {CLASSIFICATION: AutoModelForSequenceClassification, IMAGE_CLASSIFICATION: AutoModelForImageClassification,
            LANGUAGE_MODELING: AutoModelForCausalLM}[task_kind]


def load_base_model(info: ModelInfo, task_kind: str, num_labels: Optional[int], tokenizer=None, label_names=None,
                    fresh_head: bool = False, random_weights: bool = False, loading: Optional[dict] = None):
    """The transformers model for the task, in float32: sequence or image classification, or causal LM for a text
    corpus. ``fresh_head``: a saved classification head of another size is replaced by a new one instead of refused
    (always for images: hub image classifiers carry heads of 1,000 classes); ``random_weights``: the architecture
    from its config alone (no weights read); ``tokenizer``: gives a classifier without a pad token id the
    tokenizer's; ``loading``: a dict given gets ``fresh_head``, whether the head was initialised anew."""
    from transformers import AutoConfig

    auto = _auto_class(task_kind)
    kwargs = {}
    if task_kind != LANGUAGE_MODELING:
        kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": fresh_head or task_kind == IMAGE_CLASSIFICATION}
        if label_names is not None:
            kwargs["id2label"] = dict(enumerate(label_names))
            kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    try:
        if random_weights:
            kwargs.pop("ignore_mismatched_sizes", None)
            config, _ = from_pretrained(AutoConfig.from_pretrained, info.path, info.local_only, **kwargs)
            model, renewed = auto.from_config(config), None
        else:
            (model, found), _ = from_pretrained(auto.from_pretrained, info.path, info.local_only,
                                                output_loading_info=True, **kwargs)
            renewed = set(found.get("missing_keys", ())) | {key[0] for key in found.get("mismatched_keys", ())}
    except Exception as error:  # noqa: BLE001
        raise UsageError(f"could not load model '{info.name}': {first_line(error)}") from None
    if loading is not None:
        head = head_name(model)
        loading["fresh_head"] = head is not None and (renewed is None or any(
            key.split(".")[0] == head for key in renewed))
    model = model.float()
    if task_kind == CLASSIFICATION and getattr(model.config, "pad_token_id", None) is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def check_compatible(info: ModelInfo, task: Task) -> None:
    model_type = info.config.model_type
    if task.kind == LANGUAGE_MODELING and not info.decoder:
        raise UsageError(
            f"task '{task.name}' is language modelling (a text file) but model '{info.name}' is an "
            f"encoder ({model_type}); use a decoder model such as GPT-2 or Llama"
        )
    if task.kind == IMAGE_CLASSIFICATION and not info.image:
        raise UsageError(f"task '{task.name}' holds images but model '{info.name}' ({model_type}) is not an image "
                         "classifier; use a vision model such as ViT (e.g. google/vit-base-patch16-224-in21k)")
    if task.kind == CLASSIFICATION and info.image:
        raise UsageError(f"task '{task.name}' holds text but model '{info.name}' ({model_type}) is an image model; "
                         "give it a folder of images or a CSV / JSONL of image paths")


def head_name(model) -> Optional[str]:
    """The classification head's module name ('classifier' for BERT-likes, 'score' for decoders), if any."""
    names = {name for name, _ in model.named_children()}
    return next((h for h in HEAD_NAMES if h in names), None)


def default_target_modules(model, task_kind: str = CLASSIFICATION) -> Optional[list]:
    """A classifier's (text or image) attention query and value projections, by the names the model uses; None
    for a language model: PEFT's default for the architecture."""
    if task_kind == LANGUAGE_MODELING:
        return None
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for pair in (["query", "value"], ["q_proj", "v_proj"]):  # BERT-likes and ViT up to transformers 4; ViT in 5
        if set(pair) <= leaves:
            return pair
    return None


def quiet_libraries(threads: Optional[int] = None) -> None:
    """Register the methods with PEFT and keep transformers' info messages, download bars and deprecation notes
    about its own internals (raised from inside PEFT) out of the command's output; ``threads``: torch's CPU
    threads (None: torch's choice)."""
    import warnings

    import torch
    from transformers.utils import logging as transformers_logging

    import spectral_peft  # noqa: F401  (registers the methods with PEFT)

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if threads:
        torch.set_num_threads(threads)
