//! Detection at the scale the smallest wanted face needs, in overlapping tiles (pure geometry).
//!
//! With `min_face` set, detect scales the photo so that a face of `min_face` original
//! pixels reaches [`YUNET_SMALLEST_FACE`], the smallest size at which YuNet finds faces
//! reliably (measured; docs/quality.md, "Large photos"). At that scale a 12 MP photo is
//! several thousand pixels wide, so YuNet runs over it in square tiles, each resized
//! from the decoded photo on its own: memory holds one tile, whatever the photo's size.
//!
//! Neighbouring tiles overlap by [`Plan::overlap`]. A face no wider than the overlap lies
//! whole in some tile, so a box that touches a tile's inner edge is a cut face and is
//! dropped there; the tile that holds the face whole reports it. Faces wider than the
//! overlap are large enough for the whole-photo pass at `width` that runs beside the
//! tiles, and the overlap is chosen so. Boxes from all tiles and the whole-photo pass
//! are merged in original pixels ([`merge`]).

use facepipe_core::messages::FaceBox;

/// The face side, in the pixels YuNet sees, that `min_face` is brought to. Measured on
/// `tools/make_sheets.py` sheets with `pipeline eval` at several widths (docs/quality.md,
/// "Large photos"): faces of 20-24 px were found 8% of the time seen at 7-8 px, 42% at
/// 10-12, 60% at 14-17 and 68% at their own size; recall keeps rising to about 30 px, at
/// the square of the cost. 16 px keeps `min_face = 20` within 8x the default's cost.
pub const YUNET_SMALLEST_FACE: f64 = 16.0;

/// The side of a tile, in scaled pixels, when the overlap allows (a multiple of 32, as YuNet
/// wants): large enough that the overlaps add under half to the work (1.44x the pixels of a
/// 12 MP photo at `min_face = 20`), small enough that
/// YuNet's working memory stays that of the default's.
pub const TILE: u32 = 960;

/// How far inside a tile's inner edge (scaled pixels) a box counts as touching it.
const EDGE: f32 = 2.0;

/// Where the tiles of one photo lie, in scaled pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Scaled pixels per original pixel.
    pub scale: f64,
    /// Scaled width and height of the photo.
    pub width: u32,
    /// Scaled height of the photo.
    pub height: u32,
    /// The side of a tile.
    pub tile: u32,
    /// How much neighbouring tiles share, at least.
    pub overlap: u32,
    /// Left edges of the tile columns.
    pub xs: Vec<u32>,
    /// Top edges of the tile rows.
    pub ys: Vec<u32>,
}

/// One tile: its rectangle in scaled pixels, and which of its edges are inside the photo.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tile {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width (a tile at the photo's edge may be narrower than [`Plan::tile`] only when the photo is).
    pub w: u32,
    /// Height.
    pub h: u32,
    /// Inner edges: left, top, right, bottom.
    pub inner: [bool; 4],
}

impl Plan {
    /// The tiles for a photo of `width` x `height` original pixels, detected at `width_param`
    /// (the topology's `width`) as a whole, when faces of `min_face` pixels need more than
    /// that. `None` when the whole-photo pass already sees them at [`YUNET_SMALLEST_FACE`].
    pub fn for_photo(width: u32, height: u32, width_param: u32, upscale: bool, min_face: u32) -> Option<Plan> {
        let long = width.max(height) as f64;
        let mut whole = width_param as f64 / long;
        if !upscale {
            whole = whole.min(1.0);
        }
        let scale = YUNET_SMALLEST_FACE / min_face.max(1) as f64;
        if scale <= whole * 1.0001 {
            return None;
        }
        let (sw, sh) = (((width as f64) * scale).round().max(1.0) as u32, ((height as f64) * scale).round().max(1.0) as u32);
        // Faces wider than the overlap are left to the whole-photo pass: there they must be
        // at least 1.5 times YuNet's smallest size.
        let overlap = (1.5 * YUNET_SMALLEST_FACE * scale / whole).ceil() as u32;
        let overlap = overlap.div_ceil(32) * 32;
        let tile = TILE.max(3 * overlap).div_ceil(32) * 32;
        Some(Plan { scale, width: sw, height: sh, tile, overlap, xs: starts(sw, tile, overlap), ys: starts(sh, tile, overlap) })
    }

    /// Every tile, row by row.
    pub fn tiles(&self) -> impl Iterator<Item = Tile> + '_ {
        self.ys.iter().flat_map(move |&y| {
            self.xs.iter().map(move |&x| {
                let (w, h) = (self.tile.min(self.width - x), self.tile.min(self.height - y));
                Tile { x, y, w, h, inner: [x > 0, y > 0, x + w < self.width, y + h < self.height] }
            })
        })
    }
}

/// Left (or top) edges of tiles of `tile` covering `length` with at least `overlap` shared,
/// spread evenly so the first starts at 0 and the last ends at `length`.
fn starts(length: u32, tile: u32, overlap: u32) -> Vec<u32> {
    if length <= tile {
        return vec![0];
    }
    let step = (tile - overlap) as f64;
    let n = ((length - tile) as f64 / step).ceil() as u32 + 1;
    let span = (length - tile) as f64;
    (0..n).map(|i| (span * i as f64 / (n - 1) as f64).round() as u32).collect()
}

impl Tile {
    /// Whether `face` (in this tile's pixels) touches one of its inner edges: a face cut
    /// by the edge, found whole in a neighbour or by the whole-photo pass.
    pub fn cuts(&self, face: &FaceBox) -> bool {
        let [left, top, right, bottom] = self.inner;
        (left && face.x <= EDGE)
            || (top && face.y <= EDGE)
            || (right && face.x + face.w >= self.w as f32 - EDGE)
            || (bottom && face.y + face.h >= self.h as f32 - EDGE)
    }
}

/// One face found twice (in two tiles, or by a tile and the whole-photo pass) is kept
/// once: boxes are taken highest score first, and one whose IoU with a kept box exceeds
/// `nms_threshold`, or that lies mostly (60%) inside a kept box or holds one, is dropped.
/// (Keeping the larger of two nested boxes instead found fewer faces on the sheets.)
pub fn merge(mut faces: Vec<FaceBox>, nms_threshold: f32) -> Vec<FaceBox> {
    faces.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<FaceBox> = Vec::with_capacity(faces.len());
    for face in faces {
        let same = kept.iter().any(|k| {
            let (inter, union) = overlap(k, &face);
            union > 0.0 && (inter / union > nms_threshold || inter / (k.w * k.h).min(face.w * face.h) > 0.6)
        });
        if !same {
            kept.push(face);
        }
    }
    kept
}

/// Intersection over union of two boxes.
pub fn iou(a: &FaceBox, b: &FaceBox) -> f32 {
    let (inter, union) = overlap(a, b);
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// The area two boxes share, and the area they cover together.
fn overlap(a: &FaceBox, b: &FaceBox) -> (f32, f32) {
    let iw = ((a.x + a.w).min(b.x + b.w) - a.x.max(b.x)).max(0.0);
    let ih = ((a.y + a.h).min(b.y + b.h) - a.y.max(b.y)).max(0.0);
    let inter = iw * ih;
    (inter, a.w * a.h + b.w * b.h - inter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_tiles_when_the_whole_photo_pass_sees_the_faces() {
        // 640 px photo at width 640: a 16 px face is already 16 px.
        assert_eq!(Plan::for_photo(640, 480, 640, true, 16), None);
        // A 4000 px photo at 640: a 100 px face is 16 px; min_face 100 changes nothing.
        assert_eq!(Plan::for_photo(4000, 3000, 640, true, 100), None);
    }

    #[test]
    fn tiles_cover_the_photo_with_the_overlap() {
        let plan = Plan::for_photo(4000, 3000, 640, true, 20).unwrap();
        assert!((plan.scale - 0.8).abs() < 1e-9);
        assert_eq!((plan.width, plan.height), (3200, 2400));
        // Faces over 120 scaled px (150 original) are 24 px at width 640: the whole-photo pass's.
        assert_eq!(plan.overlap, 128);
        let tiles: Vec<Tile> = plan.tiles().collect();
        assert_eq!(tiles.len(), plan.xs.len() * plan.ys.len());
        for axis in [&plan.xs, &plan.ys] {
            assert_eq!(axis[0], 0);
            for pair in axis.windows(2) {
                assert!(pair[0] + plan.tile >= pair[1] + plan.overlap, "{axis:?}");
            }
        }
        assert_eq!(plan.xs.last().unwrap() + plan.tile, plan.width);
        assert_eq!(plan.ys.last().unwrap() + plan.tile, plan.height);
        assert_eq!(tiles[0].inner, [false, false, true, true]);
        assert_eq!(tiles.last().unwrap().inner, [true, true, false, false]);
    }

    #[test]
    fn a_box_at_an_inner_edge_is_a_cut_face() {
        let tile = Tile { x: 0, y: 0, w: 640, h: 640, inner: [false, false, true, true] };
        let face = |x, y| FaceBox::new(x, y, 40.0, 40.0, 0.9);
        assert!(!tile.cuts(&face(0.0, 0.0)), "the photo's own edge cuts nothing");
        assert!(tile.cuts(&face(600.0, 100.0)), "the right edge is inner");
        assert!(tile.cuts(&face(100.0, 599.0)));
        assert!(!tile.cuts(&face(590.0, 590.0)));
    }

    #[test]
    fn a_face_found_twice_is_kept_once() {
        let a = FaceBox::new(100.0, 100.0, 40.0, 40.0, 0.9);
        let b = FaceBox::new(101.0, 99.0, 41.0, 40.0, 0.8);
        let inside = FaceBox::new(110.0, 110.0, 20.0, 20.0, 0.95);
        let apart = FaceBox::new(200.0, 100.0, 40.0, 40.0, 0.7);
        let kept = merge(vec![b, apart, a, inside], 0.3);
        assert_eq!(kept, vec![inside, apart], "each place once, by its highest score");
    }
}
