"""Short video clips for the video-pair tests, written with PyAV (LLaMA-Factory reads videos with it too)."""

from __future__ import annotations

from pathlib import Path


def write_video(path: Path, colors: list[tuple[int, int, int]], size: int = 56, fps: int = 2) -> Path:
    """A short MPEG-4 clip, one solid frame per color (PyAV, which LLaMA-Factory reads videos with)."""
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for color in colors:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), color, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_clip(path: Path, index: int, frames: int = 4) -> Path:
    """Clip ``index`` of a dataset: four solid frames whose colors differ from frame to frame and clip to clip."""
    colors = [((index * 40 + frame * 60) % 256, (frame * 90) % 256, (index * 70) % 256) for frame in range(frames)]
    return write_video(path, colors)
