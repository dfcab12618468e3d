"""The decode loop on the real SmolLM2 (needs qllm_evals for the model and its chat template)."""

import pytest
import torch

from qllm_samplers.generate import generate


class Argmax:
    def select(self, scores, state, rng):
        return scores.argmax(dim=-1)


@pytest.mark.slow
def test_greedy_matches_transformers_on_smollm2(smollm2):
    from qllm_evals.models import chat_prompt_ids, left_pad

    model, tokenizer = smollm2
    prompts = chat_prompt_ids(tokenizer, ["What is 12 + 7? Answer briefly.", "Name a colour."])
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    ours = generate(model, ids, attention_mask=mask, sampler=Argmax(), max_new_tokens=16,
                    eos_token_id=tokenizer.eos_token_id)
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, top_k=None,
                            top_p=None, temperature=None)
    assert torch.equal(ours.sequences, theirs[:, : ours.sequences.shape[1]])
    assert "19" in tokenizer.decode(ours.new_tokens[0])
