"""Cloud Storage staging throughput against the local emulator (fake-gcs-server): the stages' parallel transfer
(`jobs.common.storage`: the client's transfer manager, sliced downloads for large objects, a thread pool for
many files) vs a single stream doing the same transfers one request at a time, in this run.

Run: .venv/bin/python bench/staging_throughput.py [--large-mb 512] [--files 200] [--file-kb 512]
On an emulator on the same machine this measures request overhead and concurrency, not network bandwidth.
"""

from __future__ import annotations

import argparse
import os
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

        single_up = timed(lambda: [bucket.blob(f"single/many/{p.name}").upload_from_filename(str(p)) for p in sorted(many.iterdir())])
        parallel_up = timed(lambda: storage.publish_dir(many, "gs://bench/parallel/many"))
        storage.publish_dir(large.parent, "gs://bench/parallel/large")
        single_down = timed(lambda: [bucket.blob(f"single/many/{p.name}").download_to_filename(str(work / "d1")) for p in sorted(many.iterdir())])
        parallel_down = timed(lambda: storage.stage_in("gs://bench/parallel/many", work / "d2"))
        single_large = timed(lambda: bucket.blob("parallel/large/model.bin").download_to_filename(str(work / "d3.bin")))
        parallel_large = timed(lambda: storage.stage_in("gs://bench/parallel/large/model.bin", work / "d4"))
        assert (work / "d4" / "model.bin").stat().st_size == large.stat().st_size

    def row(what: str, mb: float, single: float, parallel: float) -> None:
        print(f"{what:34s} single stream {mb / single:7.1f} MB/s   parallel {mb / parallel:7.1f} MB/s   ratio {single / parallel:.2f}x")

    row(f"upload {args.files} x {args.file_kb} KB", many_mb, single_up, parallel_up)
    row(f"download {args.files} x {args.file_kb} KB", many_mb, single_down, parallel_down)
    row(f"download one {args.large_mb} MB object", args.large_mb, single_large, parallel_large)
    print("(large uploads to the emulator use one resumable stream: fake-gcs-server lacks the XML multipart API "
          "that parallel composite uploads need, so that path is not compared here)")


if __name__ == "__main__":
    main()
