"""The web page's speed: start-up time to the first page, and the latency of one image and of a batch of 8.

    python bench/app.py --model Bone_age_prediction/model [--images DIR] [--repeats 3]

Starts `boneage serve` on a free port, times process start → the first page answered, then posts radiographs to the
JSON API (one, and eight in one request), with and without Grad-CAM overlays; the first request with overlays also
loads Keras, so it is timed apart. Prints a table and one JSON line.
"""
import argparse, json, os, socket, statistics, subprocess, sys, time, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="Bone_age_prediction/model")
    ap.add_argument("--images", help="folder of radiographs (default: the RSNA sample, else the course's phantoms)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import httpx
    sys.path.insert(0, str(ROOT))
    from boneage.data import find_rsna_sample
    folder = Path(args.images) if args.images else (find_rsna_sample() / "images" if find_rsna_sample() else ROOT / "Bone_age_prediction" / "phantom" / "images")
    images = sorted(folder.glob("*.png"))[:8]
    port, t0 = free_port(), time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "boneage", "serve",
                               "--model", args.model, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try: urllib.request.urlopen(url, timeout=1); break
            except OSError: time.sleep(0.05)
        startup = time.perf_counter() - t0
        res = {"startup_to_first_page_s": round(startup, 2), "images": f"{len(images)} from {folder.name}"}
        with httpx.Client(timeout=600) as c:
            def post(paths, overlay):
                files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
                t = time.perf_counter()
                r = c.post(f"{url}/api/predict", files=files, data={"sex": "F", "overlay": str(overlay).lower()})
                assert r.status_code == 200 and all(x["bone_age_months"] for x in r.json()["results"]), r.text[:300]
                return time.perf_counter() - t
            post(images[:1], False)  # warm-up
            for overlay in (False, True):
                if overlay: res["first_overlay_request_s"] = round(post(images[:1], True), 2)  # loads Keras
                for n in (1, 8):
                    times = [post(images[:n], overlay) for _ in range(args.repeats)]
                    res[f"latency_{n}_image{'s' if n > 1 else ''}{'_with_overlays' if overlay else ''}_s"] = round(statistics.median(times), 3)
    finally:
        server.terminate(); server.wait(timeout=30)
    for k, v in res.items(): print(f"{k:40s} {v}")
    print(json.dumps({**res, "machine": f"{os.uname().machine}, {os.cpu_count()} cores"}))


if __name__ == "__main__":
    main()
