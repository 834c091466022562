"""Random-weight tiny models and a word-level tokenizer for tests that need no shipped asset."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

WORDS = 120  # vocabulary: <pad> <eos> <unk> w0 .. w119
PAD, EOS = 0, 1


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace-separated words w0..w119; left padding, like em_sweep.models.load_tokenizer."""
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2}
    vocab.update({f"w{i}": 3 + i for i in range(WORDS)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def random_qwen2(seed: int = 0, layers: int = 2, hidden: int = 64, dtype: torch.dtype = torch.float32,
                 peaky: float = 20.0) -> Qwen2ForCausalLM:
    """A random Qwen2 over the word vocabulary; ``peaky`` scales the head so greedy has no near-ties."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=WORDS + 3, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, eos_token_id=EOS, pad_token_id=PAD)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(peaky)
    model.generation_config.eos_token_id = EOS
    return model.to(dtype).eval()


def prompts(n: int, seed: int = 0, min_len: int = 2, max_len: int = 9) -> list[str]:
    """``n`` prompts of ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        out.append(" ".join(f"w{int(i)}" for i in torch.randint(0, WORDS, (length,), generator=g)))
    return out
