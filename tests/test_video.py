"""Video files through PyAV (the optional `video` extra): a real clip is encoded here and read back through
`load_frames` and `VideoPreprocessor`; without PyAV, the error names the extra."""
import sys

import numpy as np
import pytest
import skimage.data
import torch

from mmlit.core import BadRecordError, MissingExtraError, np_rng
from mmlit.preprocess import image_preset
from mmlit.patches import Qwen2VLPatcher, VideoPreprocessor, load_frames, sample_frame_indices

N_FRAMES, H, W = 24, 96, 128


def source_frames() -> np.ndarray:
    "The clip's frames: a window moving over a real photo, 5 px down and 7 px right per frame."
    photo = skimage.data.astronaut()                                   # 512×512
    return np.stack([photo[40 + 5 * t: 40 + 5 * t + H, 60 + 7 * t: 60 + 7 * t + W] for t in range(N_FRAMES)])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    "An MPEG-4 file of `source_frames()` (lossy), encoded with PyAV."
    av = pytest.importorskip("av")
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = W, H, "yuv420p", 4_000_000
        for f in source_frames():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        container.mux(stream.encode())                                # flush
    return path


def matching_source(frames: np.ndarray) -> list[int]:
    "For each decoded frame, the index of the source frame it is closest to (the codec is lossy)."
    src = source_frames().astype(np.float32)
    return [int(np.abs(src - f.astype(np.float32)).mean(axis=(1, 2, 3)).argmin()) for f in frames]


def test_every_frame_comes_back_in_order(clip):
    frames = load_frames(clip, max_frames=100)
    assert frames.shape == (N_FRAMES, H, W, 3) and frames.dtype == np.uint8
    assert matching_source(frames) == list(range(N_FRAMES))
    err = np.abs(frames.astype(np.int16) - source_frames()).mean()
    assert err < 8, err                                                # a faithful decode, not just the right order


def test_uniform_sampling(clip):
    frames = load_frames(clip, max_frames=6)
    assert frames.shape == (6, H, W, 3)
    assert matching_source(frames) == sample_frame_indices(N_FRAMES, 6).tolist() == [2, 6, 10, 14, 18, 22]
    assert np.array_equal(frames, load_frames(clip, max_frames=6))


def test_random_sampling_is_determined_by_rng(clip):
    draws = [load_frames(clip, 6, "random", np_rng(3, epoch, 7)) for epoch in range(4)]
    assert all(np.array_equal(d, load_frames(clip, 6, "random", np_rng(3, e, 7))) for e, d in enumerate(draws))
    picked = [matching_source(d) for d in draws]
    assert picked[0] == sample_frame_indices(N_FRAMES, 6, "random", np_rng(3, 0, 7)).tolist()
    assert all(4 * i <= v < 4 * (i + 1) for p in picked for i, v in enumerate(p))   # one frame per segment of 4
    assert len({tuple(p) for p in picked}) > 1                                       # epochs draw different frames


def test_video_preprocessor_reads_the_file(clip):
    x = VideoPreprocessor(max_frames=4, images=image_preset("clip"))(clip)
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    patcher = Qwen2VLPatcher()
    out = VideoPreprocessor(max_frames=4, patcher=patcher)(clip)
    th, tw = patcher.target_size(H, W)                                 # 84 × 140
    assert out["video_grid_thw"].tolist() == [[2, th // 14, tw // 14]]
    assert out["pixel_values_videos"].shape == (2 * (th // 14) * (tw // 14), 1176)
    assert torch.equal(out["pixel_values_videos"], patcher.video(load_frames(clip, 4))["pixel_values_videos"])
    train = VideoPreprocessor(max_frames=4, sampling="random", images=image_preset("clip", train=True))
    assert torch.equal(train(clip, np_rng(0, 1, 2)), train(clip, np_rng(0, 1, 2)))


def test_corrupt_video_is_a_bad_record(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(BadRecordError, match="cannot decode video"):
        load_frames(path)


def test_without_pyav_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)                      # `import av` now raises ImportError
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(MissingExtraError, match=r"pip install 'mmlit\[video\]'"):
        load_frames(path)
    with pytest.raises(ImportError):                                  # still an ImportError for callers that catch that
        VideoPreprocessor(images=image_preset("clip"))(path)
