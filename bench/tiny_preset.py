"""Pick the tiny dual-encoder preset: train on the bundled demo (handwriting held out) with a plain loop over
mmlit's loader, and print steps/s, held-out zero-shot digit accuracy and hard-negative accuracy per eval.

    python bench/tiny_preset.py --seconds 150 --vision resnet --size 32 --batch 128 --lr 2e-3

Test rows are the demo rows whose digit was written by a hand (`digit_index % 5 == 0`) never seen in training.
"""
import argparse, json, math, time

import numpy as np
import pyarrow.parquet as pq
import torch

from mmlit.sources import ParquetImageText
from mmlit.demo import ensure_demo
from mmlit.loader import LoaderConfig, make_loader
from mmlit.datamodule import RowSubset
from mmlit.model import DualEncoder, DualEncoderConfig
from mmlit.multimodal import build_preprocessor
from mmlit.text import train_tokenizer
from mmlit.metrics import digit_prompts, zero_shot_classifier, zero_shot_accuracy, hard_negative_hits

VISION = {
    "resnet": dict(model_type="resnet", num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                   layer_type="basic", downsample_in_first_stage=False),
    "resnet2": dict(model_type="resnet", num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[2, 2, 2],
                    layer_type="basic", downsample_in_first_stage=False),
    "resnet_w": dict(model_type="resnet", num_channels=3, embedding_size=48, hidden_sizes=[48, 96, 192], depths=[1, 1, 1],
                     layer_type="basic", downsample_in_first_stage=False),
    "convnext": dict(model_type="convnext", num_channels=3, patch_size=2, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], num_stages=3),
    "convnext_w": dict(model_type="convnext", num_channels=3, patch_size=2, hidden_sizes=[64, 128, 256], depths=[1, 1, 1], num_stages=3),
    "vit": dict(model_type="vit", image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=256),
}


def swap_digit(caption: str, d: int, k: int) -> str:
    "The caption with digit `d` (numeral and word) replaced by `k`."
    from mmlit.demo import DIGIT_WORDS
    words = caption.split(" ")
    out = [w.replace(str(d), str(k)) if w.strip("(),").isdigit() else w.replace(DIGIT_WORDS[d], DIGIT_WORDS[k]) if w.strip("(),") == DIGIT_WORDS[d] else w
           for w in words]
    return " ".join(out)


def matched_accuracy(model, tok, img, captions, labels):
    "Digit accuracy when the 10 class prompts of an image are its own caption with each digit: all other words known."
    from mmlit.metrics import encode_prompts
    hits = 0
    for e, c, y in zip(img, captions, labels.tolist()):
        t = encode_prompts(model, tok, [swap_digit(c, y, k) for k in range(10)])
        hits += int((t @ e).argmax() == y)
    return hits / len(labels)


def split(path):
    t = pq.read_table(path, columns=["digit_index", "label"])
    hand, label = np.asarray(t["digit_index"]), np.asarray(t["label"])
    test = hand % 5 == 0
    return np.flatnonzero(~test), np.flatnonzero(test), label


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=150); ap.add_argument("--vision", default="resnet")
    ap.add_argument("--size", type=int, default=32); ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3); ap.add_argument("--pool", default="mean")
    ap.add_argument("--text_pool", default="mean"); ap.add_argument("--aug", action="store_true")
    ap.add_argument("--threads", type=int, default=1); ap.add_argument("--eval_every", type=int, default=50)
    ap.add_argument("--embed", type=int, default=512); ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--text_layers", type=int, default=2); ap.add_argument("--text_width", type=int, default=128)
    ap.add_argument("--hn_weight", type=float, default=0.0)
    ap.add_argument("--cosine", action="store_true", help="cosine decay of the lr to 0 over --steps")
    ap.add_argument("--wd", type=float, default=0.1); ap.add_argument("--steps", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    demo = ensure_demo()
    ds = ParquetImageText(demo["parquet"], decode=False)
    train_rows, test_rows, label = split(demo["parquet"][0])
    tok = train_tokenizer((ds.get(int(i))["text"] for i in train_rows), vocab_size=512)
    prep = build_preprocessor("clip", tok, train=a.aug, size=a.size, uint8=True, **({} if not a.aug else dict(flip=0.0, jitter=0.0, crop_scale=(0.8, 1.0))))
    eval_prep = build_preprocessor("clip", tok, train=False, size=a.size, uint8=True)
    train = make_loader(RowSubset(ds, train_rows), LoaderConfig(batch_size=a.batch, seed=0, collate="contrastive", train=True),
                        transform=prep, collate_options={"tokenizer": tok})
    test = make_loader(RowSubset(ds, test_rows), LoaderConfig(batch_size=256, seed=0, collate="contrastive", train=False),
                       transform=eval_prep, collate_options={"tokenizer": tok})
    test_batches = list(test)
    test_labels = torch.as_tensor(label[test_rows])
    seen = make_loader(RowSubset(ds, train_rows[:len(test_rows)]), LoaderConfig(batch_size=256, seed=0, collate="contrastive", train=False),
                       transform=eval_prep, collate_options={"tokenizer": tok})
    seen_batches, seen_labels = list(seen), torch.as_tensor(label[train_rows[:len(test_rows)]])
    test_captions = [ds.get(int(i))["text"] for i in test_rows]
    vision = dict(VISION[a.vision]);
    if vision["model_type"] == "vit": vision["image_size"] = a.size
    text = dict(model_type="bert", vocab_size=len(tok), hidden_size=a.text_width, num_hidden_layers=a.text_layers,
                num_attention_heads=4, intermediate_size=2 * a.text_width, max_position_embeddings=128)
    dims = [d for d in (512, 256, 128, 64, 32) if d <= a.embed]
    cfg = DualEncoderConfig(vision=vision, text=text, vision_pooling=a.pool, text_pooling=a.text_pool, embed_dim=a.embed,
                            mrl_dims=dims, hard_negative_weight=a.hn_weight)
    model = DualEncoder(cfg)
    decay = [p for p in model.parameters() if p.ndim >= 2]; no = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=a.wd), dict(params=no, weight_decay=0.0)], lr=a.lr)
    prompts = digit_prompts()
    print(f"setup {time.time() - t0:.1f}s; train {len(train_rows)} test {len(test_rows)} rows; vocab {len(tok)}", flush=True)

    def evaluate(batches=test_batches, labels=test_labels):
        model.eval()
        with torch.no_grad():
            img = torch.cat([model.encode_image(b["pixel_values"]) for b in batches])
            cls = zero_shot_classifier(model, tok, prompts)
            zs = zero_shot_accuracy(img, labels, cls)
            hits = [hard_negative_hits(o.image_embeds, o.text_embeds, o.negative_embeds, o.negative_mask)
                    for o in (model(**b, return_loss=False) for b in batches)]
            hn = sum(h for h, _ in hits) / sum(n for _, n in hits)
        model.train()
        return zs, hn

    step, t_train, epoch, hist = 0, 0.0, 0, []
    total = a.steps or None
    while True:
        for batch in train:
            ts = time.time()
            model.set_step(epoch, step)
            lr = a.lr * min(1.0, (step + 1) / a.warmup)
            if a.cosine and total: lr *= 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
            for g in opt.param_groups: g["lr"] = lr
            out = model(**batch)
            opt.zero_grad(set_to_none=True); out.loss.backward(); opt.step()
            t_train += time.time() - ts
            step += 1
            if step % a.eval_every == 0:
                zs, hn = evaluate()
                zs_seen, hn_seen = evaluate(seen_batches, seen_labels)
                hist.append(dict(step=step, train_s=round(t_train, 1), loss=round(out.loss.item(), 3), zs=round(zs, 3), hn=round(hn, 3),
                                 zs_seen=round(zs_seen, 3), hn_seen=round(hn_seen, 3)))
                print(json.dumps(hist[-1]), f"{step / t_train:.2f} steps/s (incl. loading)", flush=True)
            if (total and step >= total) or (not total and t_train > a.seconds): break
        else:
            epoch += 1; train.set_epoch(epoch) if hasattr(train, "set_epoch") else None
            continue
        break
    zs, hn = evaluate()
    model.eval()
    with torch.no_grad():
        img = torch.cat([model.encode_image(b["pixel_values"]) for b in test_batches])
        matched = matched_accuracy(model, tok, img, test_captions, test_labels)
    print("FINAL", json.dumps(dict(vars(a), matched_digit_acc=round(matched, 3), steps_done=step, train_s=round(t_train, 1), steps_per_s=round(step / t_train, 2),
                                   zero_shot=round(zs, 3), hard_neg=round(hn, 3), wall_s=round(time.time() - t0, 1))), flush=True)


if __name__ == "__main__":
    main()
