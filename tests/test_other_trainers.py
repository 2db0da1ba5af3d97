"""mmlit's loaders under other trainers: Lightning saves the loader's state in its checkpoint and resumes mid-epoch with
exactly the remaining batches; the Hugging Face Trainer trains a stage 5 dual encoder on an mmlit loader."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mmlit.core import torch_rng
from mmlit.loader import LoaderConfig
from mmlit.datamodule import LoaderDataModule

pl = pytest.importorskip("pytorch_lightning")


def _data(n=40):
    g = torch_rng(3)
    return [{"x": torch.randn(4, generator=g), "i": i} for i in range(n)]


class DataModule(LoaderDataModule, pl.LightningDataModule):
    "mmlit's `LoaderDataModule` as a Lightning data module: Lightning stores its `state_dict` in every checkpoint."
    def __init__(self, *args, **kwargs):
        pl.LightningDataModule.__init__(self)
        LoaderDataModule.__init__(self, *args, **kwargs)


class Seen(pl.LightningModule):
    "Records which samples each training step saw."
    def __init__(self):
        super().__init__()
        self.lin, self.seen = nn.Linear(4, 1), []
    def training_step(self, batch, batch_idx):
        self.seen.append(batch["i"].tolist())
        return self.lin(batch["x"]).pow(2).mean()
    def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, **kw):
    kw = {"enable_checkpointing": False, **kw}
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, **kw)


def test_lightning_resumes_mid_epoch_with_the_remaining_batches(tmp_path):
    cfg = LoaderConfig(batch_size=4, seed=0)
    ref = Seen()                         # 2 epochs of 10 batches; a checkpoint after step 13, 3 batches into epoch 1
    every = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=13, save_top_k=-1)
    _trainer(tmp_path, max_epochs=2, callbacks=[every], enable_checkpointing=True).fit(ref, DataModule(_data(), config=cfg))
    assert len(ref.seen) == 20
    ckpt = next((tmp_path / "ck").glob("*step=13*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)
    assert (saved["DataModule"]["train"]["epoch"], saved["DataModule"]["train"]["position"]) == (1, 12)   # 3 batches of 4

    resumed = Seen()                     # as after a crash: a new process resumes from that checkpoint
    _trainer(tmp_path, max_epochs=2).fit(resumed, DataModule(_data(), config=cfg), ckpt_path=ckpt)
    assert resumed.seen == ref.seen[13:]                               # exactly the remaining batches, none replayed


def test_hf_trainer_trains_a_dual_encoder_on_an_mmlit_loader(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from mmlit.demo import build_demo_parquet
    from mmlit.datamodule import build_loader
    from mmlit.model import DualEncoder, DualEncoderConfig

    path = build_demo_parquet(tmp_path / "demo.parquet", n=64)[0]
    loader = build_loader(dict(data=str(path), tokenizer={"train": {"vocab_size": 300}, "save_dir": str(tmp_path / "tok")},
                               preprocessor="clip", preprocessor_options=dict(size=32, uint8=True), max_length=32, batch_size=16))
    vocab = len(transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok")))
    model = DualEncoder(DualEncoderConfig.preset("tiny", vocab_size=vocab))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class MmlitTrainer(transformers.Trainer):
        "The HF Trainer reading batches from an mmlit loader (its order, sharding and state stay mmlit's)."
        def get_train_dataloader(self): return loader
        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            out = model(**inputs)
            return (out.loss, out) if return_outputs else out.loss

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=6, per_device_train_batch_size=16,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1, disable_tqdm=True, remove_unused_columns=False)
    t = MmlitTrainer(model=model, args=args)
    out = t.train()
    assert out.global_step == 6 and torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(losses) == 6
