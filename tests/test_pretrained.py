"""Starting from the models users have, offline: tiny CLIP, SigLIP, Qwen2-VL and Llama checkpoints written with
`save_pretrained` into a temporary Hugging Face cache (`mmlit.hub.save_to_hub_cache`) and named by hub ids. Runs built
from those ids (CLIP and SigLIP dual encoders, a Llama causal LM through `build_run` / `mmlit train`; the Qwen2-VL
embedder through its own config, the recipe has no embedder kind) take the checkpoint's tokenizer and pixel statistics;
LoRA and frozen-base runs checkpoint only what trains, resume bit for bit after SIGKILL, leave frozen weights untouched,
export a merged model that gives the adapter model's outputs without `peft`; bad input names itself."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
import yaml

from mmlit.checkpoint import MANIFEST, WEIGHTS, BaseModelMismatch, CheckpointManager, safetensors_header
from mmlit.core import CheckpointError, ConfigError
from mmlit.demo import build_demo_parquet, corpus_documents
from mmlit.hub import hub_cache, save_to_hub_cache
from mmlit.preprocess import NORMALIZATIONS, Normalization
from mmlit.recipe import build_run, export_model, split_by_group
from mmlit.kinds import ModelSpec, model_config

ROOT = Path(__file__).parent.parent
JOB = str(Path(__file__).parent / "recipe_job.py")
CLIP_MEAN, CLIP_STD = (0.2, 0.3, 0.4), (0.25, 0.2, 0.3)


def _tokenizer(texts, bos: bool = False):
    "mmlit's trained tokenizer; with `bos`, CLIP-style: `<|im_start|>` before every text, `<|endoftext|>` after."
    from tokenizers.processors import TemplateProcessing
    from mmlit.text import train_tokenizer
    tok = train_tokenizer(texts, vocab_size=300)
    if bos:
        tok.bos_token = "<|im_start|>"
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single="<|im_start|> $A <|endoftext|>",
            special_tokens=[("<|im_start|>", tok.bos_token_id), ("<|endoftext|>", tok.eos_token_id)])
    return tok


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    "A hub cache holding tiny acme/tiny-{clip,siglip,qwen2-vl,llama}, the demo pairs split in two, a text corpus."
    import transformers, warnings
    from transformers import (AutoConfig, CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM, Qwen2VLForConditionalGeneration,
                              SiglipConfig, SiglipModel)
    from mmlit.embedder import tiny_qwen2_vl_config
    from mmlit.model import seeded_init
    d = tmp_path_factory.mktemp("pretrained")
    path = build_demo_parquet(d / "demo.parquet", n=96, image_size=32)[0]
    train, val = split_by_group(path, "digit_index", 0.25, d / "split")
    corpus = d / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_documents()[:40]) + "\n")
    import pyarrow.parquet as pq
    captions = pq.read_table(path, columns=["caption"])["caption"].to_pylist()
    cache = d / "hub"
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    ctok, tok = _tokenizer(captions, bos=True), _tokenizer(captions + corpus_documents()[:40])
    ids = dict(vocab_size=len(ctok), bos_token_id=ctok.bos_token_id, eos_token_id=ctok.eos_token_id, pad_token_id=ctok.pad_token_id)
    with seeded_init(11), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = CLIPModel(CLIPConfig(text_config=dict(max_position_embeddings=40, **ids, **tiny),
                                    vision_config=dict(image_size=32, patch_size=8, **tiny), projection_dim=16))
        clip_pp = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=32, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
        siglip = SiglipModel(SiglipConfig(text_config=dict(max_position_embeddings=40, **ids, **tiny),
                                          vision_config=dict(image_size=32, patch_size=8, **tiny)))
        siglip_pp = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
        qcfg = {k: v for k, v in tiny_qwen2_vl_config(tok).items() if k != "model_type"}
        qwen = Qwen2VLForConditionalGeneration(AutoConfig.for_model("qwen2_vl", **qcfg))
        qwen_pp = transformers.Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56 * 4})
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), num_key_value_heads=2, max_position_embeddings=256,
                                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **tiny))
    for objs, name in (([clip, clip_pp, ctok], "acme/tiny-clip"), ([siglip, siglip_pp, ctok], "acme/tiny-siglip"),
                       ([qwen, qwen_pp, tok], "acme/tiny-qwen2-vl"), ([llama, tok], "acme/tiny-llama")):
        save_to_hub_cache(objs, name, cache)
    return dict(cache=cache, train=train, val=val, corpus=corpus, clip=clip, siglip=siglip, qwen=qwen, llama=llama, tok=tok, ctok=ctok)


def _dual(run_dir, w, pretrained="acme/tiny-clip", steps: int = 8, **model) -> dict:
    return {"run_dir": str(run_dir), "threads": 1, "seed": 0, "log": {"progress": False},
            "data": {"data": str(w["train"]), "val_data": str(w["val"]), "max_length": 24, "loader": {"batch_size": 16}},
            "model": {"kind": "dual_encoder", "pretrained": pretrained, **model},
            "optim": {"lr": 1e-3}, "schedule": {"max_steps": steps}, "checkpoint": {"every": 2, "keep": 10},
            "eval": {"at_epoch_end": False}}


def _env(w, **extra):
    env = {**os.environ, "HF_HUB_CACHE": str(w["cache"]), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}
    return env


def _snapshot(w, repo: str) -> Path:
    d = w["cache"] / ("models--" + repo.replace("/", "--"))
    return d / "snapshots" / (d / "refs" / "main").read_text()


def _losses(run_dir) -> list[float]:
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_clip_run_takes_the_checkpoints_towers_tokenizer_and_pixels(tmp_path, world):
    "One setting, `model.pretrained: acme/tiny-clip`: both towers, the tokenizer and the image statistics come from it."
    with hub_cache(world["cache"]):
        run = build_run(_dual(tmp_path / "run", world, steps=2))
        clip = world["clip"]
        assert torch.equal(run.model.vision.embeddings.patch_embedding.weight, clip.vision_model.embeddings.patch_embedding.weight)
        assert torch.equal(run.model.text_proj.weight, clip.text_projection.weight)         # the heads: CLIP's own
        r = run.fit()
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["model"]["preset"] == "pretrained" and resolved["data"]["tokenizer"] == "acme/tiny-clip"
    assert resolved["data"]["preprocessor_options"] == {"pretrained": "acme/tiny-clip"}
    assert run.tokenizer.get_vocab() == world["ctok"].get_vocab()
    norm = run.data.transform.preprocessor.images.normalize
    assert norm == Normalization(CLIP_MEAN, CLIP_STD) and norm != NORMALIZATIONS.get("clip")   # the checkpoint's, not the preset's
    assert run.model.normalization == norm and run.data.transform.preprocessor.images.size == (32, 32)
    batch = next(iter(run.data.val_dataloader()))
    assert (batch["input_ids"][:, 0] == world["ctok"].bos_token_id).all()                   # CLIP's captions start with bos
    assert r.steps == 2 and len(_losses(tmp_path / "run")) == 2 and all(x == x for x in _losses(tmp_path / "run"))


def test_siglip_run_with_a_locked_vision_tower(tmp_path, world):
    "`freeze: [vision]` (open_clip's --lock-image): the tower does not move, bit for bit, and is not in the checkpoints."
    with hub_cache(world["cache"]):
        run = build_run(_dual(tmp_path / "run", world, "acme/tiny-siglip", freeze=["vision"], options={"siglip_weight": 1.0}))
        before = {k: v.clone() for k, v in run.model.vision.state_dict().items()}
        text_before = run.model.text.embeddings.token_embedding.weight.clone()
        run.fit()
    assert run.model.normalization == NORMALIZATIONS.get("half")
    after = run.model.vision.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(run.model.text.embeddings.token_embedding.weight, text_before)   # the text tower trained
    sig = world["siglip"].vision_model.state_dict()
    assert all(torch.equal(after[k], sig[k]) for k in sig if k in after)                   # and the vision tower is SigLIP's
    ck = CheckpointManager(tmp_path / "run" / "checkpoints").latest()
    m = json.loads((ck / MANIFEST).read_text())
    assert m["weights"] == "trainable" and m["pretrained"]["vision"]["repo_id"] == "acme/tiny-siglip"
    assert not any(k.startswith("vision.") for k in safetensors_header(ck / WEIGHTS))


def _wait(pred, proc, timeout=300.0, what=""):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None: raise AssertionError(f"the job exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout: proc.kill(); raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _n_losses(d) -> int:
    try: return len(_losses(d))
    except (FileNotFoundError, json.JSONDecodeError): return 0


def test_lora_run_killed_resumes_bit_exactly_and_exports_a_merged_model(tmp_path, world):
    "A LoRA run of `mmlit train`'s job: small checkpoints, SIGKILL + resume = the uninterrupted run, a merged export."
    cfg = _dual(None, world, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    def job(name, **env):
        c = {**cfg, "run_dir": str(tmp_path / name)}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(c))
        (tmp_path / f"{name}-out").mkdir(exist_ok=True)
        return subprocess.Popen([sys.executable, JOB, str(tmp_path / f"{name}.yaml"), str(tmp_path / f"{name}-out")],
                                env=_env(world, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ref = job("ref"); out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]
    # killed after 5 logged steps, checkpoints every 2 (each write slowed so the run is still going)
    p = job("run", MMLIT_CHECKPOINT_WRITE_DELAY="0.5")
    _wait(lambda: _n_losses(tmp_path / "run") >= 5, p, what="5 steps")
    p.send_signal(signal.SIGKILL); p.wait()
    ck = CheckpointManager(tmp_path / "run" / "checkpoints")
    assert ck.latest() is not None and json.loads((ck.latest() / MANIFEST).read_text())["step"] < 8
    p = job("run"); out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    ref_w, got_w = torch.load(tmp_path / "ref-out" / "rank0.pt"), torch.load(tmp_path / "run-out" / "rank0.pt")
    assert ref_w.keys() == got_w.keys() and all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["resumed_from"]
    # only what trains is checkpointed: far smaller than the base model; the base weights did not move
    last = CheckpointManager(tmp_path / "run" / "checkpoints").latest()
    base_bytes = (_snapshot(world, "acme/tiny-clip") / "model.safetensors").stat().st_size
    assert (last / WEIGHTS).stat().st_size < base_bytes / 4
    names = safetensors_header(last / WEIGHTS)
    assert all("lora_" in k for k in names if k.startswith(("vision.", "text.")))
    base = world["clip"].vision_model.encoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(got_w["vision.encoder.layers.0.self_attn.q_proj.base_layer.weight"], base)
    assert got_w["vision.encoder.layers.0.self_attn.q_proj.lora_B.default.weight"].abs().sum() > 0   # the adapters trained
    # the merged export loads without peft and gives the adapter model's embeddings
    with hub_cache(world["cache"]):
        export_model(tmp_path / "run", tmp_path / "export")
        run = build_run({**cfg, "run_dir": str(tmp_path / "run")})
    run.model.load_state_dict(got_w)
    run.model.eval()
    batch = next(iter(run.data.val_dataloader()))
    with torch.no_grad(): want = run.model(**batch, return_loss=False)
    torch.save({k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}, tmp_path / "batch.pt")
    code = ("import sys, torch; sys.modules['peft'] = None\n"                       # as if peft were not installed
            "from mmlit.model import DualEncoder\n"
            f"m = DualEncoder.from_pretrained({str(tmp_path / 'export')!r}).eval(); b = torch.load({str(tmp_path / 'batch.pt')!r})\n"
            "with torch.no_grad(): o = m(**b, return_loss=False)\n"
            f"torch.save({{'image': o.image_embeds, 'text': o.text_embeds}}, {str(tmp_path / 'merged.pt')!r})\n")
    q = subprocess.run([sys.executable, "-c", code], env={**_env(world), "HF_HUB_CACHE": str(tmp_path / "empty")},
                       capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-3000:]
    merged = torch.load(tmp_path / "merged.pt")
    assert (merged["image"] - want.image_embeds).abs().max() < 1e-5 and (merged["text"] - want.text_embeds).abs().max() < 1e-5
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / "export").get_vocab() == world["ctok"].get_vocab()


def test_causal_lm_from_a_hub_id_with_lora(tmp_path, world):
    "A Llama by hub id: its tokenizer by default, LoRA on q/v, the merged export gives the adapter model's logits."
    from mmlit.causal_lm import CausalLM
    cfg = {"run_dir": str(tmp_path / "lm"), "threads": 1, "log": {"progress": False},
           "data": {"data": str(world["corpus"]), "task": "lm", "max_length": 32, "val_split": 0.1, "loader": {"batch_size": 8}},
           "model": {"kind": "causal_lm", "pretrained": "acme/tiny-llama", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
           "optim": {"lr": 3e-3}, "schedule": {"max_steps": 4}}
    with hub_cache(world["cache"]):
        run = build_run(cfg)
        emb = run.model.model.model.embed_tokens.weight.clone()
        run.fit()
        export_model(tmp_path / "lm", tmp_path / "export")
    assert run.tokenizer.get_vocab() == world["tok"].get_vocab()
    assert torch.equal(run.model.model.model.embed_tokens.weight, emb)                   # frozen under LoRA
    batch = next(iter(run.data.val_dataloader()))
    run.model.eval()
    with torch.no_grad():
        want = run.model(**batch).logits
        got = CausalLM.from_pretrained(tmp_path / "export").eval()(**batch).logits
    assert (got - want).abs().max() < 1e-4
    ck = CheckpointManager(tmp_path / "lm" / "checkpoints").latest()
    assert json.loads((ck / MANIFEST).read_text())["pretrained"]["model"]["repo_id"] == "acme/tiny-llama"


def test_qwen2_vl_chat_model_from_a_hub_id_with_lora(tmp_path, world):
    "Qwen2-VL as a causal LM by hub id (`preprocessor: qwen2_vl`): its tokenizer and pixel budget by default, LoRA trains."
    cfg = {"run_dir": str(tmp_path / "vl"), "threads": 1, "log": {"progress": False},
           "data": {"data": str(world["train"]), "val_data": str(world["val"]), "preprocessor": "qwen2_vl", "max_length": 96,
                    "loader": {"batch_size": 4}},
           "model": {"kind": "causal_lm", "pretrained": "acme/tiny-qwen2-vl", "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}},
           "schedule": {"max_steps": 2}, "eval": {"max_batches": 1}}
    with hub_cache(world["cache"]):
        run = build_run(cfg)
        r = run.fit()
    resolved = yaml.safe_load((tmp_path / "vl" / "config.yaml").read_text())["data"]
    assert resolved["tokenizer"] == "acme/tiny-qwen2-vl" and resolved["preprocessor_options"] == {"pretrained": "acme/tiny-qwen2-vl"}
    assert run.data.transform.preprocessor.vision.max_pixels == 56 * 56 * 4
    assert r.steps == 2 and "val/loss" in r.last_eval and type(run.model.model).__name__ == "Qwen2VLForConditionalGeneration"
    q = world["qwen"].state_dict()
    got = run.model.model.state_dict()
    shared = [k for k in q if k in got]                                                     # all but the adapted q/v layers
    assert len(shared) > 20 and all(torch.equal(got[k], q[k]) for k in shared)            # base weights unchanged (LoRA only)


def test_qwen2_vl_embedder_from_a_hub_id_with_lora(tmp_path, world):
    "The embedder's backbone by hub id, its patches from the checkpoint's processor, LoRA adapters, a merged export."
    from mmlit.embedder import EmbedderConfig, Qwen2VLEmbedder
    from mmlit.finetune import apply_finetune, export_merged
    from mmlit.datamodule import build_data_module
    from mmlit.train import Trainer
    with hub_cache(world["cache"]):
        dm = build_data_module({"data": str(world["train"]), "tokenizer": "acme/tiny-qwen2-vl", "preprocessor": "qwen2_vl",
                                "preprocessor_options": {"pretrained": "acme/tiny-qwen2-vl"}, "max_length": 96, "batch_size": 4, "seed": 0})
        patcher = dm.transform.preprocessor.vision
        assert (patcher.min_pixels, patcher.max_pixels) == (56 * 56, 56 * 56 * 4)
        cfg = EmbedderConfig(backbone_pretrained="acme/tiny-qwen2-vl", embed_dim=32, mrl_dims=[32, 16]).with_instructions(world["tok"])
        spec = ModelSpec("qwen2vl_embedder", pretrained="acme/tiny-qwen2-vl", options={"embed_dim": 32, "mrl_dims": [32, 16]})
        assert model_config(spec, world["tok"]) == cfg                                # the run config's way to the same model
        model = apply_finetune(Qwen2VLEmbedder(cfg), lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
        base = {k: v.clone() for k, v in model.backbone.state_dict().items() if "lora_" not in k}
        t = Trainer(model, {"run_dir": str(tmp_path / "emb"), "threads": 1, "log": {"progress": False}, "schedule": {"max_steps": 3},
                            "optim": {"lr": 1e-2}, "checkpoint": {"at_epoch_end": False}}, dm.train_dataloader())
        t.fit()
    after = model.backbone.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)                              # the backbone's own weights: untouched
    qwen = world["qwen"].model.state_dict()
    assert torch.equal(after["language_model.layers.0.self_attn.q_proj.base_layer.weight"], qwen["language_model.layers.0.self_attn.q_proj.weight"])
    ck = CheckpointManager(tmp_path / "emb" / "checkpoints").latest()
    assert json.loads((ck / MANIFEST).read_text())["weights"] == "trainable"
    assert all("lora_" in k or not k.startswith("backbone.") for k in safetensors_header(ck / WEIGHTS))
    batch = next(iter(dm.train_dataloader()))
    model.eval()
    with torch.no_grad():
        want = model(**batch, return_loss=False)
        export_merged(model, tmp_path / "export")
        got = Qwen2VLEmbedder.from_pretrained(tmp_path / "export").eval()(**batch, return_loss=False)
    assert (got.image_embeds - want.image_embeds).abs().max() < 1e-5 and (got.text_embeds - want.text_embeds).abs().max() < 1e-5


def test_unknown_hub_id_offline_names_it_and_how_to_fetch_it(tmp_path, world):
    "`mmlit train` with a model id that is not in the cache: exit 2, one line naming the id and `hf download`, nothing written."
    cfg = _dual(tmp_path / "run", world, "acme/not-there")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.run([sys.executable, "-m", "mmlit.cli", "train", str(tmp_path / "c.yaml")], env=_env(world),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "acme/not-there: not a local folder, and not in the Hugging Face cache" in p.stderr and "hf download acme/not-there" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "run").exists()
    with hub_cache(world["cache"]):
        c = _dual(tmp_path / "run", world)
        c["data"]["tokenizer"] = "acme/no-tokenizer"
        with pytest.raises(ConfigError, match="data.tokenizer: acme/no-tokenizer: not a local folder"): build_run(c)
    assert not (tmp_path / "run").exists()


def test_lora_targets_and_freeze_patterns_that_match_nothing(tmp_path, world):
    with hub_cache(world["cache"]):
        with pytest.raises(ConfigError, match=r"lora.target_modules \['query', 'value'\] matches no Linear layer in vision, text; "
                                              r"their Linear layers are named fc1, fc2, k_proj, out_proj, q_proj, v_proj"):
            build_run(_dual(tmp_path / "a", world, lora={"target_modules": ["query", "value"]}))
        with pytest.raises(ConfigError, match=r"freeze: 'visual' matches no parameter of DualEncoder; its \d+ parameters are under logit_scale, vision.embeddings.\*, "):
            build_run(_dual(tmp_path / "b", world, freeze=["visual"]))
        with pytest.raises(ConfigError, match=r"model.lora.rank"):
            build_run(_dual(tmp_path / "c", world, lora={"rank": 4}))


def test_resume_on_another_base_model_is_refused(tmp_path, world):
    "The id's main branch moves to other weights between a LoRA run and its resume: a CheckpointError, not a silent mix."
    import shutil
    from transformers import CLIPModel
    cache = tmp_path / "hub"
    shutil.copytree(world["cache"], cache, symlinks=True)
    w = {**world, "cache": cache}
    cfg = _dual(tmp_path / "run", w, lora={"r": 2})
    with hub_cache(cache):
        build_run(cfg).fit(2)
        other = CLIPModel.from_pretrained(_snapshot(w, "acme/tiny-clip"))
        with torch.no_grad(): other.visual_projection.weight.mul_(2)
        import transformers
        pp = transformers.CLIPImageProcessorPil.from_pretrained(_snapshot(w, "acme/tiny-clip"))
        save_to_hub_cache([other, pp, world["ctok"]], "acme/tiny-clip", cache)            # a new commit on main
        run = build_run(cfg)
        with pytest.raises(BaseModelMismatch, match="base model of '(text|vision)' differs from the one this checkpoint was trained on") as e:
            run.fit()
    assert isinstance(e.value, CheckpointError) and "model.safetensors" in str(e.value).split("files that differ: ")[1]
