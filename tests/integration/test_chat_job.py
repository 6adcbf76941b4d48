"""The real-model path end to end, small: a byte-level BPE tokenizer with a ChatML chat
template (trained here with the `tokenizers` library), tiny random Llama models,
messages-format JSONL rendered with that template, and enough held-out requests of
long prompts that vLLM's token budget cannot hold them in one step. Before the
engine stopped splitting prefills, seeded sampling then died with "CPU Generator
does not use offset" (issue 8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncopd.tasks.chat_prompts import generate

from test_job import run_job  # tests/integration is on sys.path (pytest prepend import mode)

pytestmark = pytest.mark.integration

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM = ("You are a careful assistant. Answer the question in plain words, keep the answer short, "
          "and say so when you do not know. ") * 4
NUM_EVAL, RKL_SAMPLES = 8, 4


def build_chat_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory) -> tuple[tuple[str, str], Path, Path, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("chat")
    train, held_out = generate()
    tokenizer = build_chat_tokenizer(train + [SYSTEM])
    paths = []
    for role, layers, seed in (("student", 1, 1), ("teacher", 2, 2)):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=512, tie_word_embeddings=True,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=None)
        LlamaForCausalLM(config).save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)
        paths.append(str(root / role))

    def write(path: Path, prompts: list[str]) -> Path:
        lines = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}]}
                 for p in prompts]
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return path

    prompt_tokens = len(tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": held_out[0]}],
        add_generation_prompt=True, tokenize=True, return_dict=False))
    return ((paths[0], paths[1]), write(root / "train.jsonl", train[:64]),
            write(root / "eval.jsonl", held_out[:NUM_EVAL]), prompt_tokens)


def test_chat_job_with_bpe_tokenizer_and_a_full_token_budget(tmp_path, chat_setup) -> None:
    models, train, eval_, prompt_tokens = chat_setup
    # One evaluation submits NUM_EVAL x (1 + RKL_SAMPLES) requests at once: more prompt
    # tokens than vLLM's 2,048-token step budget, so a prefill would be split.
    assert NUM_EVAL * (1 + RKL_SAMPLES) * prompt_tokens > 2048
    run_dir = tmp_path / "chat"
    result = run_job(run_dir, models, "task.name=chat", "task.reward=none", f"task.train_path={train}",
                     f"task.eval_path={eval_}", f"task.num_eval_prompts={NUM_EVAL}",
                     f"eval.rkl_samples={RKL_SAMPLES}", "actor.max_num_seqs=64", "actor.max_model_len=320",
                     "actor.max_new_tokens=24", "learner.batch_size=16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "does not use offset" not in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["policy_version"] == 4
    assert summary["samples_trained"] == 4 * 16
    for key in ("eval/rkl_before", "eval/rkl_after"):
        assert summary[key] is not None and summary[key] >= 0.0, key
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(str(run_dir / "hf"))
    assert exported.chat_template == CHATML and len(exported) == 512
