import torch

from em_sweep.generation.sample import SamplingSettings, position_ids_for, response_masks, sample_responses
from em_sweep.prompts import format_prompt

EOS, PAD = 9, 0


def test_response_mask_ragged_left_padded_by_hand():
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    responses = torch.tensor([[5, EOS, PAD, PAD], [6, 7, 8, 8], [EOS, PAD, PAD, PAD]])
    attention, response, lengths, hit_eos = response_masks(responses, [EOS], prompt_mask)
    assert lengths.tolist() == [2, 4, 1]
    assert hit_eos.tolist() == [True, False, True]
    assert attention.tolist() == [
        [0, 0, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 0, 0, 0],
    ]
    # Position t is on when token t+1 was generated: prompt tokens and padding never are.
    assert response.tolist() == [
        [0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 1, 0, 0, 0, 0],
    ]


def test_eos_equal_to_pad_counts_only_the_first():
    prompt_mask = torch.ones(1, 2, dtype=torch.long)
    responses = torch.tensor([[4, EOS, EOS, EOS]])
    _, response, lengths, _ = response_masks(responses, [EOS], prompt_mask)
    assert lengths.tolist() == [2]
    assert response.tolist() == [[0, 1, 1, 0, 0, 0]]


def test_position_ids_skip_left_padding():
    assert position_ids_for(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]


def test_masked_positions_reproduce_generation_with_ragged_prompts(tiny):
    """Forward over the sampled batch (left padding, ragged prompts) predicts exactly the
    generated tokens at the masked positions: the mask and positions line up with generation."""
    model, tok = tiny
    texts = [format_prompt(tok, q) for q in ("What is 3+4?", "What is 12+30-7+45?", "What is 99-1?")]
    batch = sample_responses(model, tok, texts, SamplingSettings(temperature=0.0, max_new_tokens=40), batch_size=3)
    lengths = tok(texts, add_special_tokens=False)["attention_mask"]
    assert len({sum(m) for m in lengths}) == 3  # really ragged
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=position_ids_for(batch.attention_mask)).logits
    mask = batch.response_mask.bool()
    predicted = logits.argmax(-1)[:, :-1][mask[:, :-1]]
    target = batch.input_ids[:, 1:][mask[:, :-1]]
    assert torch.equal(predicted, target)
    assert int(mask.sum()) == int(batch.response_lengths.sum())
    assert not mask[:, : batch.prompt_len - 1].any()


def test_sampling_is_deterministic_for_a_seed(tiny):
    model, tok = tiny
    texts = [format_prompt(tok, "What is 10+20+30?")] * 6
    settings = SamplingSettings(temperature=1.0, top_p=0.95, max_new_tokens=30)
    a = sample_responses(model, tok, texts, settings, batch_size=3, seed=7)
    b = sample_responses(model, tok, texts, settings, batch_size=3, seed=7)
    c = sample_responses(model, tok, texts, settings, batch_size=3, seed=8)
    assert a.texts == b.texts and torch.equal(a.input_ids, b.input_ids)
    assert a.texts != c.texts
