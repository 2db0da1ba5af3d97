"""Offline stand-ins for stage 1-2 outputs: a tiny tokenizer, per-sample dicts, tiny HF models."""
import pydoc_data.topics

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<eos>", "<|image_pad|>",
            "<|vision_start|>", "<|vision_end|>"]


def corpus(n: int | None = None) -> list[str]:
    "The stdlib's pydoc topic documents (a real English text corpus that needs no download)."
    docs = [t for t in pydoc_data.topics.topics.values() if t.strip()]
    return docs[:n] if n else docs


def tiny_tokenizer(padding_side: str = "right", vocab_size: int = 400) -> PreTrainedTokenizerFast:
    "A word-level tokenizer trained on a few pydoc topics, with [CLS] ... [SEP] around each text."
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus(20), trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="<eos>",
                                   padding_side=padding_side)


def text_sample(tok, text: str, task=None) -> dict:
    "A stage-2 text sample: input_ids, attention_mask, labels (1-D int64)."
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone(), task=task)


def qwen_sample(tok, grids, text: str, merge: int = 2, seed: int = 0) -> dict:
    "A stage-2 Qwen2-VL sample: each image as <|vision_start|> image_pad*(t*h*w/merge^2) <|vision_end|>, then text."
    g = torch.Generator().manual_seed(seed)
    img, vs, ve = (tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
    ids = []
    for t, h, w in grids: ids += [vs] + [img] * (t * h * w // merge**2) + [ve]
    ids = torch.tensor(ids + tok(text)["input_ids"], dtype=torch.long)
    mm = (ids == img).long()
    thw = torch.tensor(grids, dtype=torch.long).view(-1, 3)
    n_patch = int(thw.prod(-1).sum())
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.where(mm.bool(), -100, ids),
                pixel_values=torch.randn(n_patch, 1176, generator=g), image_grid_thw=thw, mm_token_type_ids=mm)


def tiny_qwen2_vl(tok, attn: str = "eager"):
    "A randomly initialised 2-layer Qwen2-VL whose image (and, if it has one, video) token is the tokenizer's."
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")}
    video = tok.get_vocab().get("<|video_pad|>", tok.unk_token_id)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=1, embed_dim=32, num_heads=2, hidden_size=32, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=video,
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(cfg).eval()


def tiny_llama(vocab_size: int, attn: str = "eager"):
    "A randomly initialised 2-layer Llama."
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()
