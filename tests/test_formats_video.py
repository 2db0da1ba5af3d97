"""Video records end to end: a JSONL of short clips encoded here with PyAV (one file broken, one too short),
frames picked by stage 2's sampler from the record's generator, Qwen2-VL video patches laid out as transformers
lays them out, a tiny Qwen2-VL taking the batch, and frames as an image list for fixed-size models."""
import json

import numpy as np
import pytest
import torch

from collate_helpers import tiny_qwen2_vl
from mmlit.collate import MultimodalCollator, Qwen2VLCollator
from mmlit.core import np_rng
from mmlit.sources import JsonlImageText
from mmlit.mixture import DeterministicDataset
from mmlit.formats import Conversations, open_dataset
from mmlit.multimodal import ChatPreprocessor, build_preprocessor
from mmlit.preprocess import image_preset
from mmlit.patches import Qwen2VLPatcher, load_frames

av = pytest.importorskip("av")

H, W = 56, 84
LENGTHS = {"a.mp4": 12, "b.mp4": 7, "c.mp4": 9, "short.mp4": 1}


def clip_frames(n: int, seed: int) -> np.ndarray:
    "`n` frames of a smooth pattern moving by one step per frame (survives MPEG-4 compression)."
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([np.stack([(x * 3 + 9 * t + seed * 40) % 256, (y * 4 + 5 * t) % 256, ((x + y) * 2 + seed * 70) % 256], -1)
                     for t in range(n)]).astype(np.uint8)


def encode(path, frames):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = W, H, "yuv420p", 2_000_000
        for f in frames: container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    for k, (name, n) in enumerate(LENGTHS.items()): encode(d / name, clip_frames(n, k))
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    rows = [{"video": "a.mp4", "text": "a pattern drifts right"}, {"video": "broken.mp4", "text": "never decoded"},
            {"video": "b.mp4", "text": "a shorter clip"}, {"video": "short.mp4", "text": "one frame only"},
            {"video": "c.mp4", "text": "the third clip"}]
    (d / "clips.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    chats = [{"video": "a.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "The pattern."}]},
             {"video": "c.mp4", "image": "still.png",
              "conversations": [{"from": "human", "value": "<image>Compare with <video>"}, {"from": "gpt", "value": "Same colours."}]}]
    from PIL import Image
    Image.fromarray(clip_frames(1, 5)[0]).save(d / "still.png")
    (d / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in chats) + "\n")
    return d


def test_video_records_from_jsonl_and_conversations(videos):
    ds = open_dataset(videos / "clips.jsonl")
    assert isinstance(ds, JsonlImageText) and len(ds) == 5
    assert ds[0]["video"] == [str(videos / "a.mp4")] and ds[0]["image"] is None
    cv = open_dataset(videos / "chats.jsonl")
    assert isinstance(cv, Conversations)
    assert cv[1]["video"] == [str(videos / "c.mp4")] and cv[1]["messages"][0]["content"] == "<image>Compare with <video>"


def test_frames_come_from_the_records_generator(videos, tok):
    pre = ChatPreprocessor(tok, Qwen2VLPatcher(), max_frames=4, frame_sampling="random")
    rec = JsonlImageText(videos / "clips.jsonl")[0]
    picks = [pre.video_frames(rec, np_rng(0, epoch, 0))[0] for epoch in range(4)]
    again = pre.video_frames(rec, np_rng(0, 2, 0))[0]
    assert np.array_equal(picks[2], again)                                          # same (seed, epoch, index): same frames
    assert len({p.tobytes() for p in picks}) > 1                                    # other epochs: other frames
    assert np.array_equal(picks[1], load_frames(videos / "a.mp4", 4, "random", np_rng(0, 1, 0)))


def test_qwen2_vl_video_batch_and_bad_videos(videos, tok):
    pre = ChatPreprocessor(tok, Qwen2VLPatcher(), max_frames=4, min_frames=2)
    ds = DeterministicDataset(JsonlImageText(videos / "clips.jsonl"), pre, seed=0)
    samples = [ds[i] for i in range(len(ds))]
    good = [s for s in samples if s]
    assert len(good) == 3
    assert [b.reason.split(":")[0] for b in ds.report] == ["cannot decode video", "video has 1 frame(s), fewer than min_frames=2"]
    assert [b.index for b in ds.report] == [1, 3] and {b.unit for b in ds.report} == {"line"}
    s = good[0]
    frames = load_frames(videos / "a.mp4", 4)
    ref = Qwen2VLPatcher().video(frames)
    assert torch.equal(s["pixel_values_videos"], ref["pixel_values_videos"]) and torch.equal(s["video_grid_thw"], ref["video_grid_thw"])
    assert s["video_grid_thw"].tolist() == [[2, H // 14, W // 14]]
    assert int((s["mm_token_type_ids"] == 2).sum()) == 2 * (H // 14) * (W // 14) // 4
    assert s["pixel_values"].shape == (0, 1176)

    batch = Qwen2VLCollator(tok)(samples)
    assert batch["video_grid_thw"].shape == (3, 3)
    assert batch["pixel_values_videos"].shape[0] == int(batch["video_grid_thw"].prod(-1).sum())
    model = tiny_qwen2_vl(tok)
    out = model(**{k: v for k, v in batch.items() if k != "task_labels"})
    assert torch.isfinite(out.loss)
    out.loss.backward()
    with torch.no_grad():                                                       # padding changes nothing for sample 0
        alone = Qwen2VLCollator(tok)([good[0]])
        a = model(**{k: v for k, v in alone.items() if k != "task_labels"}).logits[0]
        b = model(**{k: v for k, v in batch.items() if k != "task_labels"}).logits[0, : a.shape[0]]
    assert torch.allclose(a, b, atol=1e-5)


def test_image_and_video_in_one_conversation(videos, tok):
    pre = ChatPreprocessor(tok, Qwen2VLPatcher(), max_frames=4)
    s = pre(Conversations(videos / "chats.jsonl")[1], np_rng(0))
    mm = s["mm_token_type_ids"].tolist()
    assert mm.index(1) < mm.index(2)                                            # the image run, then the video run
    assert s["image_grid_thw"].shape == (1, 3) and s["video_grid_thw"].shape == (1, 3)
    model = tiny_qwen2_vl(tok)
    out = model(**{k: v for k, v in Qwen2VLCollator(tok)([s]).items() if k != "task_labels"})
    assert torch.isfinite(out.loss)


def test_fixed_size_models_see_frames_as_images(videos, tok):
    molmo = build_preprocessor("molmo", tok, size=56, tokens_per_image=4, max_frames=3)
    recs = Conversations(videos / "chats.jsonl")
    s0, s1 = molmo(recs[0], np_rng(0)), molmo(recs[1], np_rng(1))
    assert s0["images"].shape == (3, 3, 56, 56)                                 # three frames
    assert s1["images"].shape == (4, 3, 56, 56)                                 # the still image, then three frames
    still = image_preset("molmo", size=56)(recs[1]["image"][0])
    assert torch.equal(s1["images"][0], still)
    batch = MultimodalCollator(tok)([s0, s1])
    assert batch["images"].shape == (2, 4, 3, 56, 56) and batch["image_masks"].sum(-1).tolist() == [3, 4]


def test_qwen2_vl_video_layout_matches_transformers_image_processor():
    "Without torchvision: each temporal slot of a video patch is that frame's patch as transformers' Pillow image processor cuts it."
    import warnings
    import transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.Qwen2VLImageProcessorPil()
    frames = np.random.default_rng(0).integers(0, 256, (4, 84, 112, 3), dtype=np.uint8)
    ours = Qwen2VLPatcher().video(frames)
    t, h, w = ours["video_grid_thw"][0].tolist()
    assert (t, h, w) == (2, 6, 8)
    got = ours["pixel_values_videos"].view(t, h * w, 3, 2, 14, 14)
    for k, f in enumerate(frames):
        ref = hf(images=f, return_tensors="pt")["pixel_values"].view(h * w, 3, 2, 14, 14)[:, :, 0]
        assert (got[k // 2, :, :, k % 2] - ref).abs().max() < 1e-5


def test_qwen2_vl_video_matches_transformers_video_processor():
    "transformers' Qwen2-VL video processor needs torchvision; where it is installed, ours gives its output (resize included)."
    pytest.importorskip("torchvision")
    from transformers import Qwen2VLVideoProcessor
    hf = Qwen2VLVideoProcessor()
    ours = Qwen2VLPatcher(min_pixels=hf.size["shortest_edge"], max_pixels=hf.size["longest_edge"])
    rng = np.random.default_rng(0)
    for shape in [(4, 280, 364), (5, 280, 392), (4, 240, 320), (6, 480, 640)]:   # no resize, then resized
        frames = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        ref = hf(videos=[frames], return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=False)
        got = ours.video(frames)
        assert torch.equal(got["video_grid_thw"], ref["video_grid_thw"])
        assert (got["pixel_values_videos"] - ref["pixel_values_videos"]).abs().max() < 1e-5


def test_video_and_image_records_share_a_batch(videos, tok):
    "A record without videos gets empty video patches in a batch that has some; the model takes the batch."
    from PIL import Image
    pre = ChatPreprocessor(tok, Qwen2VLPatcher(), max_frames=4)
    with_video = pre(JsonlImageText(videos / "clips.jsonl")[0], np_rng(0))
    still = Image.open(videos / "still.png")
    image_only = pre({"text": "a still", "image": still, "messages": None, "meta": {}}, np_rng(1))
    assert "video_grid_thw" not in image_only
    batch = Qwen2VLCollator(tok)([image_only, with_video])
    assert batch["video_grid_thw"].shape == (1, 3) and batch["image_grid_thw"].shape == (1, 3)
    out = tiny_qwen2_vl(tok)(**{k: v for k, v in batch.items() if k != "task_labels"})
    assert torch.isfinite(out.loss)
