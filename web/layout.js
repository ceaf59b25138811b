// Where each tile of the call goes: pure functions of the stage size and the tiles, so the layouts can be
// reasoned about (and tested) apart from the DOM. Rectangles are {x, y, width, height} in CSS pixels,
// relative to the stage.

export const GAP = 8;
const ASPECT = 16 / 9; // cameras are 16:9 (the page asks 1280x720); tiles aim for it

/**
 * Equal tiles that fill the stage: the number of columns is the one that shows each video largest at 16:9;
 * the rows then share the whole height and the columns the whole width (videos are cropped a little rather
 * than leaving bands of nothing). A short last row is centred.
 */
export function gridLayout(count, width, height, gap = GAP) {
  if (count <= 0) return [];
  let best = null;
  for (let columns = 1; columns <= count; columns++) {
    const rows = Math.ceil(count / columns);
    const w = (width - gap * (columns - 1)) / columns;
    const h = (height - gap * (rows - 1)) / rows;
    if (w <= 0 || h <= 0) continue;
    const shown = Math.min(w, h * ASPECT) * Math.min(h, w / ASPECT); // a 16:9 picture fitted in the cell
    if (!best || shown > best.shown) best = { columns, rows, w, h, shown };
  }
  if (!best) return Array.from({ length: count }, () => ({ x: 0, y: 0, width: 0, height: 0 }));
  const rects = [];
  for (let i = 0; i < count; i++) {
    const row = Math.floor(i / best.columns);
    const inRow = Math.min(best.columns, count - row * best.columns);
    const left = (width - (inRow * best.w + (inRow - 1) * gap)) / 2;
    rects.push({
      x: left + (i % best.columns) * (best.w + gap), y: row * (best.h + gap), width: best.w, height: best.h,
    });
  }
  return rects;
}

/**
 * One tile large (the pinned one, a screen share, or the active speaker) and the others in a strip: below it,
 * or on its right when the stage is much wider than tall. Tiles that do not fit in the strip are left out
 * (`null`), and `more` says how many.
 */
export function speakerLayout(count, width, height, gap = GAP) {
  if (count <= 0) return { rects: [], more: 0 };
  if (count === 1) return { rects: [{ x: 0, y: 0, width, height }], more: 0 };
  const side = width > height * 2.2; // a wide, low window: the strip goes to the right
  const others = count - 1;
  let strip; let thumb; let fits;
  if (side) {
    strip = Math.min(Math.max(width * 0.2, 160), 320);
    thumb = { width: strip, height: strip / ASPECT };
    fits = Math.max(1, Math.floor((height + gap) / (thumb.height + gap)));
  } else {
    strip = Math.min(Math.max(height * 0.18, 72), 180);
    // As wide as 16:9 allows, but narrower when that shows every other tile.
    const tileWidth = Math.min(strip * ASPECT, (width - gap * (others - 1)) / others);
    thumb = { width: Math.max(tileWidth, Math.min(strip * ASPECT, 96)), height: strip };
    fits = Math.max(1, Math.floor((width + gap) / (thumb.width + gap)));
  }
  const shown = others <= fits ? others : fits - 1; // leave room for a "+N" tile
  const more = others - shown;
  const rects = [side
    ? { x: 0, y: 0, width: width - strip - gap, height }
    : { x: 0, y: 0, width, height: height - strip - gap }];
  const slots = shown + (more ? 1 : 0);
  const span = slots * (side ? thumb.height : thumb.width) + (slots - 1) * gap;
  const start = ((side ? height : width) - span) / 2;
  for (let i = 0; i < others; i++) {
    if (i >= shown) {
      rects.push(null);
      continue;
    }
    const offset = start + i * ((side ? thumb.height : thumb.width) + gap);
    rects.push(side
      ? { x: width - strip, y: offset, width: thumb.width, height: thumb.height }
      : { x: offset, y: height - strip, width: thumb.width, height: thumb.height });
  }
  const moreRect = more ? (side
    ? { x: width - strip, y: start + shown * (thumb.height + gap), width: thumb.width, height: thumb.height }
    : { x: start + shown * (thumb.width + gap), y: height - strip, width: thumb.width, height: thumb.height })
    : null;
  return { rects, more, moreRect };
}
