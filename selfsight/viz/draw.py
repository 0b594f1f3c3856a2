"""Charts drawn with Pillow: a scatter plot with a legend and a line chart, both with axes,
ticks and labels, plus a heat colormap. Pillow is a core dependency already; matplotlib is not
needed for these few chart types."""
from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw, ImageFont

# the ten colours of matplotlib's "tab10" (Tableau 10), for classes
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
INK, GRID, WHITE = (40, 40, 40), (225, 225, 225), (255, 255, 255)


def font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)          # Pillow ≥ 10.1 with FreeType: scalable
    except TypeError:                                     # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def color(i: int) -> tuple:
    """Class ``i``'s colour: tab10, then darker and lighter variants for classes past ten."""
    base = PALETTE[i % 10]
    f = (1.0, 0.6, 1.3)[(i // 10) % 3]
    return tuple(min(255, int(c * f)) for c in base)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 × 10^k)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], first
    while v <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks


def fmt(v: float, step: float = 0.0, top: float = 0.0) -> str:
    """A tick label with as many digits as the tick ``step`` needs (2.0276, 2.0278 rather than
    2.028 twice); scientific when the axis' largest value ``top`` is ≥ 1e5 or < 1e-3."""
    top = top or abs(v)
    if v == 0:
        return "0"
    if top >= 1e5 or top < 1e-3:
        digits = max(0, math.floor(math.log10(top)) - math.floor(math.log10(step))) if step else 2
        return f"{v:.{min(digits, 4)}e}"
    if step:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        decimals += 1 if round(step / 10 ** -decimals, 6) % 1 else 0          # 2.5 × 10^k steps
        return f"{v:.{decimals}f}"
    return f"{v:.4g}"


class _Axes:
    """Data -> pixel mapping of a plot area with a frame, grid, ticks, title and axis labels."""

    def __init__(self, img: Image.Image, box: tuple, xlim: tuple, ylim: tuple):
        self.img, self.draw = img, ImageDraw.Draw(img)
        self.box = box                                      # left, top, right, bottom (pixels)
        self.xlim, self.ylim = _widen(*xlim), _widen(*ylim)

    def px(self, x: float, y: float) -> tuple[float, float]:
        l, t, r, b = self.box
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        return l + (x - x0) / (x1 - x0) * (r - l), b - (y - y0) / (y1 - y0) * (b - t)

    def frame(self, title: str, xlabel: str, ylabel: str, f: ImageFont.ImageFont) -> None:
        d, (l, t, r, b) = self.draw, self.box
        xt, yt = nice_ticks(*self.xlim), nice_ticks(*self.ylim)
        xs, ys = (xt[1] - xt[0] if len(xt) > 1 else 0.0), (yt[1] - yt[0] if len(yt) > 1 else 0.0)
        xtop, ytop = max(map(abs, xt), default=0.0), max(map(abs, yt), default=0.0)
        for v in xt:
            x, _ = self.px(v, self.ylim[0])
            d.line([(x, t), (x, b)], fill=GRID)
            d.line([(x, b), (x, b + 4)], fill=INK)
            d.text((x, b + 6), fmt(v, xs, xtop), fill=INK, font=f, anchor="ma")
        for v in yt:
            _, y = self.px(self.xlim[0], v)
            d.line([(l, y), (r, y)], fill=GRID)
            d.line([(l - 4, y), (l, y)], fill=INK)
            d.text((l - 6, y), fmt(v, ys, ytop), fill=INK, font=f, anchor="rm")
        d.rectangle(self.box, outline=INK)
        d.text(((l + r) / 2, t - 8), title, fill=INK, font=font(f.size + 2) if hasattr(f, "size") else f,
               anchor="md")
        d.text(((l + r) / 2, b + 24), xlabel, fill=INK, font=f, anchor="ma")
        if ylabel:                                          # vertical label: draw, rotate, paste
            w = int(d.textlength(ylabel, font=f)) + 4
            tmp = Image.new("RGB", (w, 18), WHITE)
            ImageDraw.Draw(tmp).text((2, 1), ylabel, fill=INK, font=f)
            tmp = tmp.rotate(90, expand=True)
            self.img.paste(tmp, (4, int((t + b) / 2 - tmp.height / 2)))


def _widen(lo: float, hi: float) -> tuple[float, float]:
    if hi - lo < 1e-12 * max(1.0, abs(lo), abs(hi)):
        pad = abs(lo) * 0.05 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def _padded(v: torch.Tensor, share: float = 0.04) -> tuple[float, float]:
    lo, hi = float(v.min()), float(v.max())
    pad = (hi - lo) * share
    return lo - pad, hi + pad


def scatter(xy: torch.Tensor, labels: torch.Tensor | None = None, names: list[str] | None = None,
            title: str = "", xlabel: str = "", ylabel: str = "", size: tuple = (760, 560),
            radius: float = 3.0) -> Image.Image:
    """N×2 points as dots, coloured by ``labels`` (N ints ≥ 0; None or −1: one colour) with a
    legend of ``names`` on the right."""
    xy = torch.as_tensor(xy, dtype=torch.float64)
    labeled = labels is not None and bool((torch.as_tensor(labels) >= 0).all())
    img = Image.new("RGB", size, WHITE)
    f = font(13)
    legend_w = 150 if labeled else 0
    ax = _Axes(img, (70, 40, size[0] - 20 - legend_w, size[1] - 52), _padded(xy[:, 0]), _padded(xy[:, 1]))
    ax.frame(title, xlabel, ylabel, f)
    d = ax.draw
    ids = torch.as_tensor(labels).long() if labeled else torch.zeros(len(xy), dtype=torch.long)
    for (x, y), c in zip(xy.tolist(), ids.tolist()):
        px, py = ax.px(x, y)
        d.ellipse((px - radius, py - radius, px + radius, py + radius), fill=color(c))
    if labeled:
        l, t = size[0] - legend_w, 44
        for row, c in enumerate(sorted(set(ids.tolist()))):
            y = t + 18 * row
            d.ellipse((l, y + 3, l + 9, y + 12), fill=color(c))
            name = names[c] if names and c < len(names) else str(c)
            d.text((l + 15, y), name[:18], fill=INK, font=f)
    return img


def line_chart(x: list[float], y: list[float], title: str = "", xlabel: str = "step", ylabel: str = "",
               size: tuple = (352, 240)) -> Image.Image:
    """One series as a polyline with its points (a single point is drawn as a dot)."""
    img = Image.new("RGB", size, WHITE)
    f = font(12)
    xs, ys = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    ax = _Axes(img, (64, 30, size[0] - 16, size[1] - 48), _padded(xs, 0.0), _padded(ys))
    ax.frame(title, xlabel, ylabel, f)
    pts = [ax.px(a, b) for a, b in zip(x, y)]
    if len(pts) > 1:
        ax.draw.line(pts, fill=PALETTE[0], width=2, joint="curve")
    if len(pts) <= 60:
        for px, py in pts:
            ax.draw.ellipse((px - 2.5, py - 2.5, px + 2.5, py + 2.5), fill=PALETTE[0])
    return img


# anchors of a perceptually ordered dark-to-bright map (close to matplotlib's "inferno")
_HEAT = torch.tensor([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)],
                     dtype=torch.float32) / 255


def heat(m: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] of shape ...×H×W -> RGB ...×3×H×W (linear between the map's anchors)."""
    pos = m.clamp(0, 1) * (len(_HEAT) - 1)
    lo = pos.floor().long().clamp(max=len(_HEAT) - 2)
    w = (pos - lo)[..., None]
    rgb = _HEAT[lo] * (1 - w) + _HEAT[lo + 1] * w                     # ...×H×W×3
    return rgb.movedim(-1, -3)


def to_pil(image: torch.Tensor) -> Image.Image:
    """3×H×W (or 1×H×W) in [0, 1] -> a Pillow RGB image."""
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    arr = (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr, "RGB")
