"""Captioned image grids (contact sheets, sample grids): images in tiles, captions wrapped beneath."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TILE_MIN, TILE_MAX, PAD, MAX_CAPTION_LINES = 128, 256, 8, 6


def wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels, at most ``MAX_CAPTION_LINES`` lines."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
        while font.getlength(line) > width and len(line) > 1:  # a word longer than the tile
            cut = len(line) - 1
            while cut > 1 and font.getlength(line[:cut]) > width:
                cut -= 1
            lines.append(line[:cut])
            line = line[cut:]
    lines.append(line)
    if len(lines) > MAX_CAPTION_LINES:
        lines, last = lines[:MAX_CAPTION_LINES], lines[MAX_CAPTION_LINES - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def fit(image: Image.Image, side: int) -> Image.Image:
    """``image`` on white, scaled so its longer side is ``side`` (NEAREST when enlarging)."""
    rgba = image.convert("RGBA")
    scale = side / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    rgba = rgba.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    flat = Image.new("RGB", size, "white")
    flat.paste(rgba, mask=rgba)
    return flat


def contact_sheet(samples: list[tuple[Image.Image, str]], path: Path, columns: int) -> Image.Image:
    """Grid of ``(image, caption)`` tiles with wrapped captions beneath; saved as PNG at ``path``."""
    font = ImageFont.load_default(size=13)  # the built-in scalable font where FreeType is present
    tile = min(TILE_MAX, max([TILE_MIN, *(max(im.size) for im, _ in samples)]))
    captions = [wrap(caption, font, tile) for _, caption in samples]
    line_h = font.getbbox("Ag")[3] + 2
    cell_w, cell_h = tile + 2 * PAD, tile + 2 * PAD + line_h * max(map(len, captions))
    columns = max(1, min(columns, len(samples)))
    rows = math.ceil(len(samples) / columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, ((image, _), lines) in enumerate(zip(samples, captions)):
        x, y = (i % columns) * cell_w + PAD, (i // columns) * cell_h + PAD
        thumb = fit(image, tile)
        tx, ty = x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2
        sheet.paste(thumb, (tx, ty))
        draw.rectangle((tx - 1, ty - 1, tx + thumb.width, ty + thumb.height), outline=(190, 190, 190))
        for n, line in enumerate(lines):
            draw.text((x, y + tile + PAD // 2 + n * line_h), line, fill="black", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return sheet


def strip(images: list[Image.Image], gap: int = 0) -> Image.Image:
    """``images`` side by side on white, top-aligned, ``gap`` pixels apart."""
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    row = Image.new("RGB", (width, max(im.height for im in images)), "white")
    x = 0
    for image in images:
        row.paste(image.convert("RGB"), (x, 0))
        x += image.width + gap
    return row


def strips_sheet(rows: list[list[Image.Image]], captions: list[str], path: Path, columns: int = 4, gap: int = 0) -> Image.Image:
    """Each row of images (e.g. input | mask | output) side by side as one captioned tile."""
    return contact_sheet([(strip(row, gap), caption) for row, caption in zip(rows, captions)], path, columns)


def pairs_sheet(lefts: list[Image.Image], rights: list[Image.Image], caption: str, path: Path, columns: int = 4) -> Image.Image:
    """``left | right`` pairs (e.g. original | reconstruction) side by side in one contact sheet."""
    return strips_sheet([[left, right] for left, right in zip(lefts, rights)], [caption] * len(lefts), path, columns)


def write_sheet(images: list[Image.Image], captions: list[str], path: Path, columns: int = 4) -> Path:
    contact_sheet(list(zip(images, captions)), path, columns)
    return Path(path)


def table_sheet(cells: list[list[Image.Image | None]], column_titles: list[str], row_titles: list[str], path: Path,
                cell: int = 96) -> Path:
    """A table of images: ``cells[r][c]`` scaled into ``cell``-pixel squares (None: left blank),
    titles above the columns and (wrapped) beside the rows."""
    font = ImageFont.load_default(size=12)
    line_h = font.getbbox("Ag")[3] + 2
    label_w = 2 * cell
    wrapped = [wrap(title, font, label_w - PAD) for title in row_titles]
    row_h = [max(cell, len(lines) * line_h) + PAD for lines in wrapped]
    width, top = label_w + len(column_titles) * (cell + PAD) + PAD, line_h * 2 + PAD
    sheet = Image.new("RGB", (width, top + sum(row_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(column_titles):
        for n, line in enumerate(wrap(title, font, cell)[:2]):
            draw.text((label_w + c * (cell + PAD), PAD // 2 + n * line_h), line, fill="black", font=font)
    y = top
    for row, lines, h in zip(cells, wrapped, row_h):
        for n, line in enumerate(lines):
            draw.text((PAD // 2, y + n * line_h), line, fill="black", font=font)
        for c, image in enumerate(row):
            if image is not None:
                thumb, x = fit(image, cell), label_w + c * (cell + PAD)
                sheet.paste(thumb, (x, y))
                draw.rectangle((x - 1, y - 1, x + thumb.width, y + thumb.height), outline=(190, 190, 190))
        y += h
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return Path(path)
