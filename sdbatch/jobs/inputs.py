"""Values a job resolves per init image when it expands: a folder of masks paired with the images by
file stem, and sizes taken from each image. They stand in a run's values as one item each (a mask
folder is not an axis of its own: `mask: {folder: masks/}` does not multiply the images), and
`resolve` turns a combination holding them into plain recipe values, with the problems it finds.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..images import aspect_differs, size_from_image
from ..recipe import MAX_SIDE

MISSING = ("skip", "full")  # what `missing:` of a mask folder may say
SIZE_KINDS = ("width", "height", "max_pixels")  # the keys of `size: {width: 768}` and its kin
SKIP = object()  # `resolve`: no task for this combination (its image has no mask, and missing: skip)


@dataclass(eq=False)
class MaskFolder:
    """`mask: {folder: masks/, glob: ..., missing: skip | full}`: each init image's mask is the mask
    of the same file stem. An image without one is an error unless `missing` says `skip` (no task)
    or `full` (the whole image is repainted, which is img2img at the run's strength: its recipe has
    no mask, so its id, file and `rerun` are those of a plain img2img of the image)."""

    folder: str
    masks: dict[str, str] = field(default_factory=dict)  # stem -> path
    missing: str | None = None

    def pair(self, image: str | None) -> Any:
        """The mask path of an init image; None for none (no image, or missing: full); SKIP."""
        if image is None:
            return None
        mask = self.masks.get(Path(image).stem)
        return SKIP if mask is None and self.missing == "skip" else mask

    def problems(self, images: list) -> list[str]:
        """Init images that share a stem (the pairing would be ambiguous), images without a mask
        (unless `missing` is set), and stray masks whose stem names no image."""
        stems: dict[str, str] = {}
        out = []
        for image in images:
            if image is not None and stems.setdefault(Path(image).stem, image) != image:
                twice = f"{Path(stems[Path(image).stem]).name} and {Path(image).name}"
                out.append(f"init images {twice} share a file stem: masks pair with images by it")
        without = [Path(p).name for s, p in stems.items() if s not in self.masks]
        if without and self.missing is None:
            shown = ", ".join(without[:5]) + (f" and {len(without) - 5} more" if len(without) > 5 else "")
            out.append(
                f"no mask in {self.folder} for {shown}; add masks of the same file stem, or set mask_missing: skip "
                "(no image for them) or mask_missing: full (repaint the whole image)"
            )
        own = sorted(
            Path(p).name for s, p in stems.items() if os.path.realpath(self.masks.get(s, "")) == os.path.realpath(p)
        )
        if own:
            out.append(f"{own[0]} would be its own mask: the mask folder holds the init images; give masks their own")
            return out
        for stem, path in self.masks.items():
            if stem not in stems:
                out.append(f"mask {Path(path).name} in {self.folder} matches no init image (masks pair by file stem)")
        return out


@dataclass(frozen=True)
class SizeOf:
    """`size: from_image`, `{width: 768}`, `{height: 768}`, `{max_pixels: 589824}`: each init image's
    own shape, at that scale, in multiples of 8 (sdbatch.images.size_from_image)."""

    kind: str  # from_image, width, height, max_pixels
    value: int | None = None

    def of(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return size_from_image(image_size, self.kind, self.value)

    def __str__(self) -> str:
        return self.kind if self.value is None else f"size {{{self.kind}: {self.value}}}"


LATER = (MaskFolder, SizeOf)  # values resolved per combination, at expansion


def stand_in(value: Any) -> Any:
    """A plain value of the same field for checking a file-name template before expansion."""
    if isinstance(value, SizeOf):
        return (512, 512)
    if isinstance(value, MaskFolder):
        return next(iter(value.masks.values()), None)
    return value


def run_problems(values: dict[str, list]) -> list[tuple[str, str]]:
    """(field, message) for a run's mask folder: listed with other masks, unpaired images, strays."""
    folders = [v for v in values["mask"] if isinstance(v, MaskFolder)]
    if not folders:
        return []
    if len(values["mask"]) > 1:
        return [("mask", "a folder of masks pairs with the init images; it cannot be listed with other masks")]
    return [("mask", message) for message in folders[0].problems(values["init_image"])]


def resolve(
    chosen: dict[str, Any], image_sizes: dict[str, tuple[int, int]], size_unset: bool
) -> tuple[Any, list[tuple[str, str]]]:
    """One combination's recipe values with its mask paired and its size taken from its image, or
    SKIP; and the (field, message) problems of its images' shapes: without `resize`, an image or
    mask of another aspect ratio than the size is refused (sdbatch never crops or stretches
    silently); with it, a mask must still have its image's shape, or the two would not line up."""
    init = chosen["init_image"]
    if init is None and chosen["resize"] is not None:
        chosen = chosen | {"resize": None}  # txt2img has nothing to resize, as it has no strength
    if isinstance(chosen["mask"], MaskFolder):
        mask = chosen["mask"].pair(init)
        if mask is SKIP:
            return SKIP, []
        chosen = chosen | {"mask": mask}
    if isinstance(chosen["size"], SizeOf):
        if init is None:
            return chosen | {"size": (512, 512)}, [("size", f"{chosen['size']} needs an init_image to take it from")]
        size_text = str(chosen["size"])
        chosen = chosen | {"size": chosen["size"].of(image_sizes[init])}
        w, h = chosen["size"]
        if not (8 <= w <= MAX_SIDE and 8 <= h <= MAX_SIDE):  # name the image: in a folder of 10,000 it matters
            iw, ih = image_sizes[init]
            message = f"{Path(init).name} is {iw}x{ih}: {size_text} makes {w}x{h}, outside 8..{MAX_SIDE}"
            return chosen | {"size": (512, 512)}, [("size", message)]  # stands in: the problem is said here
    problems = []
    size = chosen["size"]
    if chosen["resize"] is None and isinstance(size, tuple) and len(size) == 2 and all(size):
        for key in ("init_image", "mask"):
            path = chosen[key]
            if path is not None and aspect_differs(image_sizes[path], size):
                (w, h), wanted = image_sizes[path], f"size {size[0]}x{size[1]}"
                wanted = "the model's square size (size is not set)" if size_unset else wanted
                problems.append(
                    (
                        key,
                        f"{Path(path).name} is {w}x{h}, which does not have the aspect ratio of {wanted}; crop it, "
                        "choose a matching size (or size: from_image), or set resize: just, crop or fill",
                    )
                )
    elif init is not None and chosen["mask"] is not None:
        (w, h), (mw, mh) = image_sizes[init], image_sizes[chosen["mask"]]
        if aspect_differs((mw, mh), (w, h)):
            problems.append(
                (
                    "mask",
                    f"{Path(chosen['mask']).name} is {mw}x{mh} but its image {Path(init).name} is {w}x{h}: "
                    f"resize: {chosen['resize']} would not line them up; give the mask its image's shape",
                )
            )
    return chosen, problems
