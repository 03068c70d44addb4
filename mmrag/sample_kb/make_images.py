"""Draw the sample knowledge base's pictures (simple flat drawings; deterministic)."""

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent / "images"


def car(name: str, body: str, roof: str, *, length: int = 300, height: int = 60, roof_w: int = 120,
        bonnet: int = 0, wheel: int = 26) -> None:
    image = Image.new("RGB", (384, 224), (235, 240, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 180, 384, 224], fill=(120, 120, 120))
    x0 = (384 - length) // 2
    draw.rounded_rectangle([x0, 110, x0 + length, 110 + height], radius=18, fill=body)
    rx = x0 + length // 2 - roof_w // 2 + bonnet
    draw.rounded_rectangle([rx, 70, rx + roof_w, 118], radius=20, fill=roof)
    draw.rectangle([rx + 12, 80, rx + roof_w - 12, 108], fill=(180, 210, 230))
    for cx in (x0 + 55, x0 + length - 55):
        draw.ellipse([cx - wheel, 170 - wheel, cx + wheel, 170 + wheel], fill=(30, 30, 30))
        draw.ellipse([cx - 10, 160, cx + 10, 180], fill=(200, 200, 200))
    image.save(HERE / name, optimize=True)


def bumper() -> None:
    image = Image.new("RGB", (384, 224), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle([30, 90, 354, 130], radius=20, fill=(190, 195, 200), outline=(120, 120, 130), width=3)
    for x in (110, 250):
        draw.rectangle([x, 70, x + 24, 150], fill=(170, 175, 185), outline=(110, 110, 120), width=2)
    image.save(HERE / "chrome-bumper.png", optimize=True)


if __name__ == "__main__":
    HERE.mkdir(exist_ok=True)
    car("mustang-1964.png", (200, 30, 30), (170, 20, 20), bonnet=30)
    car("jaguar-e-type-1961.png", (20, 80, 40), (15, 60, 30), height=45, roof_w=90, bonnet=50)
    car("vw-beetle.png", (140, 190, 230), (120, 170, 215), length=240, height=50, roof_w=150)
    car("mini-1959.png", (240, 210, 40), (250, 250, 250), length=200, height=55, roof_w=130, wheel=18)
    bumper()
