"""Cloud Storage staging throughput against the local emulator (fake-gcs-server): the stages' parallel transfer
(`jobs.common.storage`: the client's transfer manager, sliced downloads for large objects, a thread pool for
many files) vs a single stream doing the same transfers one request at a time, in this run.

Run: .venv/bin/python bench/staging_throughput.py [--large-mb 512] [--files 200] [--file-kb 512]
On an emulator on the same machine this measures request overhead and concurrency, not network bandwidth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "dags"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large-mb", type=int, default=512)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--file-kb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; contenders alternate within each round")
    args = parser.parse_args()

    from gemma_pipeline import local

    from jobs.common import storage

    work = Path(tempfile.mkdtemp(prefix="bench-staging-"))
    with local.Emulator(work / "emulator") as emulator:
        emulator.ensure_bucket("bench")
        storage.client.cache_clear()
        bucket = storage.client().bucket("bench")
        many = work / "many"
        many.mkdir()
        for i in range(args.files):
            (many / f"part-{i:05d}.bin").write_bytes(os.urandom(args.file_kb * 1024))
        large = work / "large" / "model.bin"
        large.parent.mkdir()
        with open(large, "wb") as handle:
            for _ in range(args.large_mb):
                handle.write(os.urandom(1 << 20))
        many_mb = args.files * args.file_kb / 1024

        def timed(fn) -> float:
            started = time.perf_counter()
            fn()
            return time.perf_counter() - started

        storage.publish_dir(large.parent, "gs://bench/parallel/large")
        contenders = {
            "up": (lambda r: [bucket.blob(f"single/{r}/{p.name}").upload_from_filename(str(p)) for p in sorted(many.iterdir())],
                   lambda r: storage.publish_dir(many, f"gs://bench/parallel/{r}")),
            # Both download paths list the prefix first, as a stage reading a directory must.
            "down": (lambda r: [b.download_to_filename(str(work / "d1")) for b in bucket.list_blobs(prefix=f"single/{r}/")],
                     lambda r: storage.stage_in(f"gs://bench/parallel/{r}", work / f"d2-{r}")),
            "large": (lambda r: bucket.blob("parallel/large/model.bin").download_to_filename(str(work / "d3.bin")),
                      lambda r: storage.stage_in("gs://bench/parallel/large/model.bin", work / f"d4-{r}")),
        }
        times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in contenders}
        for r in range(args.repeats):  # interleaved: a slow moment of the machine hits both contenders alike
            for key, (single, parallel) in contenders.items():
                order = [(0, single), (1, parallel)] if r % 2 == 0 else [(1, parallel), (0, single)]
                for index, fn in order:
                    times[key][index].append(timed(lambda fn=fn, r=r: fn(r)))
        assert (work / "d4-0" / "model.bin").stat().st_size == large.stat().st_size

    def row(what: str, mb: float, key: str) -> None:
        single, parallel = times[key]
        ratios = sorted(s / p for s, p in zip(single, parallel, strict=True))
        print(f"{what:34s} single stream {mb / statistics.median(single):7.1f} MB/s   parallel "
              f"{mb / statistics.median(parallel):7.1f} MB/s   ratio median {statistics.median(ratios):.2f}x "
              f"(range {ratios[0]:.2f}-{ratios[-1]:.2f}, {len(ratios)} rounds)")

    row(f"upload {args.files} x {args.file_kb} KB", many_mb, "up")
    row(f"download {args.files} x {args.file_kb} KB", many_mb, "down")
    row(f"download one {args.large_mb} MB object", args.large_mb, "large")
    print("(large uploads to the emulator use one resumable stream: fake-gcs-server lacks the XML multipart API "
          "that parallel composite uploads need, so that path is not compared here)")


if __name__ == "__main__":
    main()
