"""Coloured shapes on coloured backgrounds, with captions, drawn on the fly from a seed.

Everything the demo model knows comes from here: no files, no downloads. Each sample is a Scene
(shape, colour, background, size, position) rendered anti-aliased and described by one of several
phrasings, so the model learns words rather than one fixed sentence.
"""

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 135, 25),
    "yellow": (240, 215, 35),
    "green": (40, 165, 65),
    "blue": (35, 85, 225),
    "purple": (135, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.4, "big": 0.62}  # side of the shape's bounding box, as a fraction of the image
POSITIONS = {  # centre of the shape, as fractions of the image
    "in the middle": (0.5, 0.5),
    "on the left": (0.34, 0.5),
    "on the right": (0.66, 0.5),
    "at the top": (0.5, 0.34),
    "at the bottom": (0.5, 0.66),
}
PHRASINGS = (
    "a {size} {colour} {shape} on a {background} background",
    "a {colour} {shape} on a {background} background",
    "a {colour} {shape} {position}, {background} background",
    "{size} {colour} {shape}, {background} background",
    "a {shape} that is {colour}, on {background}",
    "a {colour} {shape}",
)
SUPERSAMPLE = 4  # drawn larger, then downscaled: anti-aliased edges


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    position: str

    def caption(self, phrasing: int = 0) -> str:
        return PHRASINGS[phrasing].format(**self.__dict__)

    def render(self, side: int = 32) -> Image.Image:
        big = side * SUPERSAMPLE
        image = Image.new("RGB", (big, big), COLOURS[self.background])
        draw = ImageDraw.Draw(image)
        half = SIZES[self.size] * big / 2
        cx, cy = (f * big for f in POSITIONS[self.position])
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLOURS[self.colour]
        if self.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif self.shape == "square":
            draw.rectangle(box, fill=fill)
        else:  # triangle, point up
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
        return image.resize((side, side), Image.Resampling.LANCZOS)


def random_scene(rng: random.Random) -> Scene:
    colour = rng.choice(list(COLOURS))
    background = rng.choice([c for c in COLOURS if c != colour])
    return Scene(rng.choice(SHAPES), colour, background, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)))


def sample(seed: int, side: int = 32) -> tuple[Image.Image, str, Scene]:
    """Sample `seed` of the dataset: the same image and caption for the same seed, always."""
    rng = random.Random(seed)
    scene = random_scene(rng)
    return scene.render(side), scene.caption(rng.randrange(len(PHRASINGS))), scene


def vocabulary() -> list[str]:
    """Every word any caption can contain, sorted."""
    words: set[str] = set()
    fields = {"size": SIZES, "colour": COLOURS, "background": COLOURS, "shape": SHAPES, "position": POSITIONS}
    for phrasing in PHRASINGS:
        text = phrasing.replace(",", " ")
        for name, values in fields.items():
            text = text.replace("{" + name + "}", " ".join(values))
        words.update(text.split())
    return sorted(words)
