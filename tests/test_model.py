"""Stage 5: every model takes its stage 3 batch as model(**batch); save/load; bad input; the MRL draw is pure."""
import subprocess, sys

import pytest
import torch

from mmlit.collate import CausalLMCollator, collators
from mmlit.core import ConfigError
from mmlit.sources import ParquetImageText
from mmlit.demo import corpus_documents, ensure_demo
from mmlit.losses import draw_mrl_dim
from mmlit.model import (BatchError, CheckpointError, DualEncoder, DualEncoderConfig, build_tower, has_class_token, is_conv,
                         load_weights, tower_tokens, tower_width)
from mmlit.embedder import EmbedderConfig, Qwen2VLEmbedder, tiny_qwen2_vl_config
from mmlit.causal_lm import CausalLM, build_causal_lm
from mmlit.multimodal import build_preprocessor
from mmlit.packing import PackingCollator
from mmlit.text import lm_windows, train_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def demo():
    ds = ParquetImageText(ensure_demo()["parquet"], decode=False)
    tok = train_tokenizer((ds.get(i)["text"] for i in range(300)), vocab_size=300)
    return ds, tok


def contrastive_batch(ds, tok, n=6, uint8=True):
    prep = build_preprocessor("clip", tok, size=32, uint8=uint8)
    return collators.build("contrastive", tok)([prep(ds.get(i)) for i in range(n)])


def qwen_batch(ds, tok, n=4):
    prep = build_preprocessor("qwen2_vl", tok, max_length=64)
    return [prep(ds.get(i)) for i in range(n)]


# --- model(**batch) for every collator that targets a model -------------------------------------------------

@pytest.mark.parametrize("uint8", [True, False])
def test_dual_encoder_takes_contrastive_batch(demo, uint8):
    ds, tok = demo
    batch = contrastive_batch(ds, tok, uint8=uint8)
    assert batch["pixel_values"].dtype == (torch.uint8 if uint8 else torch.float32)
    model = DualEncoder(DualEncoderConfig.preset("tiny", vocab_size=len(tok))).train()
    out = model(**batch)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.logit_scale.grad is not None
    assert out.image_embeds.shape == out.text_embeds.shape == (6, model.config.embed_dim)
    assert out.negative_embeds.shape == (6, len(ds.get(0)["negatives"]), model.config.embed_dim)   # 11 on the demo data


def test_uint8_and_float_pixels_give_the_same_embeddings(demo):
    ds, tok = demo
    model = DualEncoder(DualEncoderConfig.preset("tiny", vocab_size=len(tok))).eval()
    with torch.no_grad():
        a = model.encode_image(contrastive_batch(ds, tok, uint8=True)["pixel_values"])
        b = model.encode_image(contrastive_batch(ds, tok, uint8=False)["pixel_values"])
    assert (a - b).abs().max() < 1e-5


def test_qwen2_vl_embedder_takes_qwen2_vl_batch(demo):
    ds, tok = demo
    batch = collators.build("qwen2_vl", tok)(qwen_batch(ds, tok))
    model = Qwen2VLEmbedder(EmbedderConfig(backbone=tiny_qwen2_vl_config(tok), embed_dim=64, mrl_dims=[64, 32]).with_instructions(tok))
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.image_embeds.shape == (4, 64)
    from mmlit.metrics import evaluate
    res = evaluate(model, [batch])
    assert model.training and {"loss", "i2t_r1", "t2i_r5@32", "i2t_r1_caption"} <= set(res)


def test_instruction_changes_the_query_and_unknown_task_is_named(demo):
    ds, tok = demo
    batch = collators.build("qwen2_vl", tok)(qwen_batch(ds, tok))
    cfg = EmbedderConfig(backbone=tiny_qwen2_vl_config(tok), embed_dim=32, mrl_dims=[32])
    model = Qwen2VLEmbedder(cfg.with_instructions(tok, {"retrieval": "Query: ", "code": "Code: "})).eval()
    ids, am = batch["input_ids"][:1], batch["attention_mask"][:1]
    with torch.no_grad():
        assert not torch.allclose(model.encode_text(ids, am, tasks=["retrieval"]), model.encode_text(ids, am, tasks=["code"]))
    with pytest.raises(BatchError, match="no instruction for task 'caption'"):
        model(**batch)


def test_causal_lm_takes_lm_windows_and_packed_rows():
    docs = corpus_documents()[:6]
    tok = train_tokenizer(docs, vocab_size=300)
    wins = lm_windows(docs, tok, max_length=24)
    lm = build_causal_lm("tiny", vocab_size=len(tok)).eval()
    plain = lm(**CausalLMCollator(tok)([wins[i] for i in range(4)]))
    packed = lm(**PackingCollator(tok, max_length=64)([wins[i] for i in range(4)]))
    assert plain.num_tokens == packed.num_tokens == 4 * 24
    assert abs(plain.loss.item() - packed.loss.item()) < 1e-4      # same windows, same targets, packed or not


def test_causal_lm_takes_qwen2_vl_chats_and_packed_rows(demo):
    ds, tok = demo
    samples = qwen_batch(ds, tok)
    cfg = tiny_qwen2_vl_config(tok)
    lm = CausalLM(cfg).eval()
    with torch.no_grad():
        padded = lm(**collators.build("qwen2_vl", tok)(samples))
        packed = lm(**PackingCollator(tok, max_length=128)(samples))
    assert torch.isfinite(padded.loss) and torch.isfinite(packed.loss)
    # packing drops each sequence's first target (it would cross a boundary); the first label of a chat is -100 anyway
    assert packed.num_tokens == padded.num_tokens
    assert abs(packed.loss.item() - padded.loss.item()) < 1e-4


# --- the MRL draw -------------------------------------------------------------------------------------------------

def test_mrl_draw_is_a_pure_function_of_seed_epoch_step():
    dims = (512, 256, 128, 64, 32)
    here = [draw_mrl_dim(dims, 7, e, s) for e in range(2) for s in range(50)]
    code = ("from mmlit.losses import draw_mrl_dim; import torch, random; torch.manual_seed(123); random.seed(5);"
            "print([draw_mrl_dim((512, 256, 128, 64, 32), 7, e, s) for e in range(2) for s in range(50)])")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert str(here) == there
    model = DualEncoder(DualEncoderConfig.preset("tiny", vocab_size=50, seed=7))
    model.set_step(1, 3); a = model.mrl_dim
    torch.manual_seed(0); model.set_step(0, 0); model.set_step(1, 3)
    assert a == model.mrl_dim == draw_mrl_dim(dims, 7, 1, 3)
    assert len(set(here)) == len(dims)


def test_mrl_sum_mode_sums_every_dim(demo):
    ds, tok = demo
    batch = contrastive_batch(ds, tok)
    model = DualEncoder(DualEncoderConfig.preset("tiny", vocab_size=len(tok), mrl_mode="sum")).train()
    out = model(**batch)
    assert out.mrl_dim is None and out.loss_mrl > out.loss_clip      # five CLIP losses summed


# --- save / load --------------------------------------------------------------------------------------------------

def test_save_load_identical_embeddings(demo, tmp_path):
    ds, tok = demo
    batch = contrastive_batch(ds, tok)
    model = DualEncoder(DualEncoderConfig.preset("tiny", vocab_size=len(tok), vision_pooling="multihead_attention",
                                                 text_pooling="attention")).eval()
    model.save_pretrained(tmp_path / "de")
    assert (tmp_path / "de" / "model.safetensors").is_file()
    again = DualEncoder.from_pretrained(tmp_path / "de").eval()
    with torch.no_grad():
        for d in model.config.mrl_dims:
            assert torch.equal(model.encode_image(batch["pixel_values"], d), again.encode_image(batch["pixel_values"], d))
            assert torch.equal(model.encode_text(batch["input_ids"], batch["attention_mask"], d),
                               again.encode_text(batch["input_ids"], batch["attention_mask"], d))


def test_save_load_embedder_and_lm(demo, tmp_path):
    ds, tok = demo
    batch = collators.build("qwen2_vl", tok)(qwen_batch(ds, tok))
    emb = Qwen2VLEmbedder(EmbedderConfig(backbone=tiny_qwen2_vl_config(tok), embed_dim=32, mrl_dims=[32, 16]).with_instructions(tok)).eval()
    emb.save_pretrained(tmp_path / "emb")
    again = Qwen2VLEmbedder.from_pretrained(tmp_path / "emb").eval()
    with torch.no_grad():
        a, b = emb(**batch), again(**batch)
    assert torch.equal(a.image_embeds, b.image_embeds) and torch.equal(a.text_embeds, b.text_embeds)
    lm = build_causal_lm("tiny", vocab_size=len(tok)).eval()
    lm.save_pretrained(tmp_path / "lm")
    ids = batch["input_ids"]
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, CausalLM.from_pretrained(tmp_path / "lm").eval()(input_ids=ids).logits)


def test_checkpoint_errors_name_the_key(demo, tmp_path):
    ds, tok = demo
    from safetensors.torch import load_file, save_file
    model = DualEncoder(DualEncoderConfig.preset("tiny", vocab_size=len(tok)))
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["vision_proj.weight"]; state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \['vision_proj.weight'\].*unexpected keys \['extra.weight'\]"):
        load_weights(model, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="no config.json"):
        DualEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"config.json is not a CausalLM \(it names 'DualEncoder'\)"):
        CausalLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: no such weights file"):
        DualEncoder.from_pretrained(tmp_path)


def test_one_checkpoint_error():
    "Weights that do not fit and a torn training checkpoint raise the same class, a ValueError and a RuntimeError."
    from mmlit import checkpoint, core
    assert CheckpointError is checkpoint.CheckpointError is core.CheckpointError
    assert issubclass(CheckpointError, ValueError) and issubclass(CheckpointError, RuntimeError)


# --- bad input ----------------------------------------------------------------------------------------------------

def test_bad_batches_name_the_key(demo):
    ds, tok = demo
    batch = contrastive_batch(ds, tok)
    model = DualEncoder(DualEncoderConfig.preset("tiny", vocab_size=len(tok)))
    cases = [({k: v for k, v in batch.items() if k != "pixel_values"}, "has no 'pixel_values'"),
             ({k: v for k, v in batch.items() if k != "attention_mask"}, "has no 'attention_mask'"),
             ({**batch, "input_ids": batch["input_ids"][:, :-1]}, "'attention_mask' has shape"),
             ({**batch, "pixel_values": batch["pixel_values"][:3]}, "3 images but 'input_ids' 6"),
             ({**batch, "pixel_values": batch["pixel_values"][:, :1]}, r"'pixel_values' must be \[B, 3, H, W\]"),
             ({**batch, "negative_mask": batch["negative_mask"][:, :2]}, "'negative_mask' has shape"),
             ({**batch, "negative_attention_mask": batch["negative_attention_mask"][:, :, :2]}, "'negative_attention_mask' has shape"),
             ({**batch, "input_ids": batch["input_ids"] + 10_000}, "outside the text tower's vocab_size")]
    for bad, msg in cases:
        with pytest.raises(BatchError, match=msg): model(**bad)
    vit = DualEncoder(DualEncoderConfig.preset("tiny", vocab_size=len(tok), vision=dict(
        model_type="vit", image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64), vision_pooling="cls"))
    with pytest.raises(BatchError, match=r"'pixel_values' are \(32, 32\), the vision tower takes \(64, 64\)"):
        vit(**batch)


def test_bad_configs():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) vison; known: vision, text,"): DualEncoderConfig.from_dict({"vison": {}})
    with pytest.raises(ConfigError, match="'cls' needs a tower with a \\[CLS\\] token"):
        DualEncoder(DualEncoderConfig.preset("tiny", vocab_size=50, vision_pooling="cls"))
    with pytest.raises(ConfigError, match="not divisible by 3 heads"):
        DualEncoder(DualEncoderConfig.preset("tiny", vocab_size=50, vision_pooling="multihead_attention", pool_heads=3))


# --- towers beyond ResNet, ViT and BERT ---------------------------------------------------------------------------
# Each tower is tiny and random-init; the other side is the tiny preset's. Per tower: its side, its config, the pooling
# it trains with, whether it gives a feature map, its width, and why `cls` pooling is refused (None: accepted).

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
TOWERS = {
    "convnext": ("vision", dict(model_type="convnext", patch_size=4, num_stages=2, hidden_sizes=[16, 24], depths=[1, 1]),
                 "mean", True, 24, "convnext gives a feature map"),
    "regnet": ("vision", dict(model_type="regnet", embedding_size=16, hidden_sizes=[16, 24], depths=[1, 1], groups_width=8),
               "attention", True, 24, "regnet gives a feature map"),
    "clip_vision_model": ("vision", dict(model_type="clip_vision_model", image_size=32, patch_size=8, **SMALL),
                          "cls", False, 32, None),
    "siglip_vision_model": ("vision", dict(model_type="siglip_vision_model", image_size=32, patch_size=8, **SMALL),
                            "multihead_attention", False, 32, r"siglip_vision_model has no class token"),
    "clip_text_model": ("text", dict(model_type="clip_text_model", max_position_embeddings=64, **SMALL),
                        "last", False, 32, r"clip_text_model's does not \(a causal tower"),
    "distilbert": ("text", dict(model_type="distilbert", dim=24, hidden_dim=48, n_layers=1, n_heads=2, max_position_embeddings=64),
                   "cls", False, 24, None),
    "roberta": ("text", dict(model_type="roberta", max_position_embeddings=64, **SMALL), "cls", False, 32, None),
}
VISION_TOWERS = [k for k, v in TOWERS.items() if v[0] == "vision"]


def tower_model(name, tok, **overrides):
    side, spec, pooling = TOWERS[name][:3]
    if side == "text": spec = {**spec, "vocab_size": len(tok)}
    cfg = {side: spec, f"{side}_pooling": pooling, **overrides}
    return DualEncoder(DualEncoderConfig.preset("tiny", vocab_size=len(tok), **cfg))


@pytest.mark.parametrize("name", TOWERS)
def test_tower_trains_on_a_demo_batch(demo, name):
    ds, tok = demo
    batch = contrastive_batch(ds, tok)
    side, conv, width = TOWERS[name][0], TOWERS[name][3], TOWERS[name][4]
    model = tower_model(name, tok).train()
    tower = getattr(model, side)
    assert tower.config.model_type == name and is_conv(tower) == conv and tower_width(tower) == width
    with torch.no_grad():
        out = (tower(pixel_values=batch["pixel_values"].float()) if side == "vision"
               else tower(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    assert tower_tokens(out).shape[-1] == width and (out.last_hidden_state.ndim == 4) == conv
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.image_embeds.shape == out.text_embeds.shape == (6, model.config.embed_dim)
    out.loss.backward()
    for t in (model.vision, model.text):
        assert sum(p.grad.abs().sum() for p in t.parameters() if p.grad is not None) > 0
    # DDP refuses a parameter that never gets a gradient (e.g. a tower's own pooler, unused here)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", TOWERS)
def test_tower_cls_pooling(demo, name):
    ds, tok = demo
    side, refused = TOWERS[name][0], TOWERS[name][5]
    if refused is not None:
        with pytest.raises(ConfigError, match=f"{side}_pooling 'cls' needs .*; {refused}"):
            tower_model(name, tok, **{f"{side}_pooling": "cls"})
        return
    batch = contrastive_batch(ds, tok)
    model = tower_model(name, tok, **{f"{side}_pooling": "cls"}).eval()
    with torch.no_grad():
        tokens = tower_tokens(model.vision(pixel_values=batch["pixel_values"].float() / 255)) if side == "vision" else \
            model.text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        first = model.vision_proj(tokens[:, 0]) if side == "vision" else model.text_proj(tokens[:, 0])
        embeds = model.encode_image(batch["pixel_values"].float() / 255) if side == "vision" else \
            model.encode_text(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(embeds, torch.nn.functional.normalize(first, dim=-1))
    if side == "vision": assert has_class_token(model.vision)


@pytest.mark.parametrize("name", TOWERS)
def test_tower_save_load_identical_embeddings(demo, name, tmp_path):
    ds, tok = demo
    batch = contrastive_batch(ds, tok)
    model = tower_model(name, tok).eval()
    model.save_pretrained(tmp_path / name)
    again = DualEncoder.from_pretrained(tmp_path / name).eval()
    with torch.no_grad():
        for d in (model.config.embed_dim, model.config.mrl_dims[-1]):
            assert torch.equal(model.encode_image(batch["pixel_values"], d), again.encode_image(batch["pixel_values"], d))
            assert torch.equal(model.encode_text(batch["input_ids"], batch["attention_mask"], d),
                               again.encode_text(batch["input_ids"], batch["attention_mask"], d))


@pytest.mark.parametrize("name", VISION_TOWERS)
def test_tower_image_size(demo, name):
    "A tower with a fixed image_size refuses other sizes with a BatchError; a convolutional one takes any size."
    ds, tok = demo
    pixels = contrastive_batch(ds, tok)["pixel_values"][..., :24, :24]
    model = tower_model(name, tok).eval()
    if TOWERS[name][3]:
        assert model.encode_image(pixels).shape == (6, model.config.embed_dim)
    else:
        with pytest.raises(BatchError, match=r"'pixel_values' are \(24, 24\), the vision tower takes \(32, 32\)"):
            model.encode_image(pixels)


@pytest.mark.parametrize("name", ["bert", "clip_vision_model"])
def test_pretrained_tower_drops_its_pooled_output(name, tmp_path):
    "A tower loaded from a local directory loses the parts that only feed its own pooled output, as a built one does."
    spec = dict(model_type="bert", vocab_size=50, **SMALL) if name == "bert" else TOWERS[name][1]
    built = build_tower(spec)
    built.save_pretrained(tmp_path)
    loaded = build_tower(None, pretrained=tmp_path)
    own = built.state_dict()
    assert loaded.state_dict().keys() == own.keys() and all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items())
    assert not any("pooler" in k or "post_layernorm" in k for k in own)


def test_a_config_without_a_base_model_is_named():
    from transformers import PretrainedConfig
    class NoTowerConfig(PretrainedConfig): model_type = "no_tower"
    with pytest.raises(ConfigError, match="no base model for model_type 'no_tower'"):
        build_tower(NoTowerConfig())
