import logging

import pytest
import torch

from lora_null_core.frontends.toy_world import arithmetic_texts, knowledge_texts, tiny_model, tiny_tokenizer

logging.getLogger("lora_null_core").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def knowledge():
    return knowledge_texts(240, seed=0)


@pytest.fixture(scope="session")
def task():
    return arithmetic_texts(64, seed=1)


@pytest.fixture(scope="session")
def tokenizer(knowledge, task):
    return tiny_tokenizer(knowledge + task)


@pytest.fixture
def make_model(tokenizer):
    def make(architecture="llama", seed=0, **sizes):
        return tiny_model(architecture, len(tokenizer), seed=seed, **sizes)

    return make


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory, tokenizer):
    """A tiny llama saved as an HF folder with its tokenizer: the 'original base' for file-based tests."""
    folder = tmp_path_factory.mktemp("model")
    tiny_model("llama", len(tokenizer), seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def logits(model, input_ids, attention_mask=None):
    model.eval()  # gpt2 has dropout, and PEFT leaves a wrapped model in train mode
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


def relative_error(actual, expected):
    return float((actual - expected).norm() / expected.norm())
