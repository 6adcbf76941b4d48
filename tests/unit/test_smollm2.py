"""The SmolLM2 student is cut from the teacher by dropping layers (tiny Llama stand-in here)."""

from __future__ import annotations

import pytest
import torch

from asyncopd.config import TaskConfig
from asyncopd.tasks.smollm2 import RECIPE, prune_layers, smollm2_cache_dir


def tiny_llama(num_layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=num_layers, num_attention_heads=2,
                                        num_key_value_heads=1, max_position_embeddings=64)).eval()


def test_pruned_model_keeps_the_other_layers_and_decodes_with_a_kv_cache() -> None:
    teacher = tiny_llama()
    student = prune_layers(teacher, (1,))
    assert teacher.config.num_hidden_layers == 4 and len(teacher.model.layers) == 4  # untouched
    assert student.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    for kept, original in zip(student.model.layers, [teacher.model.layers[i] for i in (0, 2, 3)]):
        assert torch.equal(kept.mlp.up_proj.weight, original.mlp.up_proj.weight)
    ids = torch.tensor([[3, 7, 11, 5]])
    with torch.no_grad():
        cached = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)  # layer_idx indexes the KV cache: wrong ones would differ


@pytest.mark.parametrize("drop", [(4,), (0, 1, 2, 3), (-1,)])
def test_impossible_drops_are_refused(drop) -> None:
    with pytest.raises(ValueError, match=r"drop_layers=.* must name distinct layers in \[0, 4\)"):
        prune_layers(tiny_llama(), drop)


def test_cache_dir_follows_task_cache_dir_and_recipe(tmp_path) -> None:
    path = smollm2_cache_dir(TaskConfig(cache_dir=str(tmp_path)))
    assert path.parent == tmp_path and path.name.startswith("smollm2-")
    assert RECIPE.drop_layers == (16, 19, 22, 25)
