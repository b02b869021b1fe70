"""An instruct model's chat template travels from its source (GGUF metadata, a Hugging Face
folder) through quantization into the packed folder, renders a conversation as transformers does,
and runs sandboxed: a template is data from whoever made the file."""

from __future__ import annotations

import pytest

import potq
from potq.errors import PotqError
from tests.gguf_writer import write_gguf
from tests.zoo import tiny_folder

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def test_a_gguf_template_reaches_the_packed_folder_and_transformers(tmp_path):
    from transformers import AutoTokenizer

    write_gguf("qwen2", tmp_path / "m.gguf", chat_template=TEMPLATE)
    lm = potq.load_model(str(tmp_path / "m.gguf"))
    assert lm.tokenizer.chat_template == TEMPLATE
    eos = lm.tokenizer.backend.id_to_token(lm.tokenizer.eos_id)
    text = lm.tokenizer.apply_chat_template(CHAT)
    assert text == f"<|system|>Be brief.{eos}\n<|user|>Hi!{eos}\n<|assistant|>"
    potq.quantize_(lm, potq.PoTConfig(3, 32), progress=False)
    packed = potq.save(lm, tmp_path / "packed")
    assert potq.load(packed).tokenizer.apply_chat_template(CHAT) == text
    assert AutoTokenizer.from_pretrained(packed).apply_chat_template(CHAT, tokenize=False,
                                                                     add_generation_prompt=True) == text


def test_a_hugging_face_folder_template_is_read(stories_float, tmp_path):
    folder = tiny_folder("llama", tmp_path / "llama", stories_float.tokenizer)
    assert potq.load_model(str(folder)).tokenizer.chat_template is None
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    assert potq.load_model(str(folder)).tokenizer.chat_template == TEMPLATE


def test_a_hostile_or_missing_template_is_one_line(stories_float):
    tokenizer = potq.load_model("stories260k").tokenizer
    with pytest.raises(PotqError, match="no chat template"):
        tokenizer.apply_chat_template(CHAT)
    tokenizer.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(PotqError, match="chat template failed"):
        tokenizer.apply_chat_template(CHAT)
    tokenizer.chat_template = "{{ raise_exception('only user and assistant roles') }}"
    with pytest.raises(PotqError, match="only user and assistant roles"):
        tokenizer.apply_chat_template(CHAT)
