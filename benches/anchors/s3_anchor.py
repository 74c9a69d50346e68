"""Anchor for benches/storage_throughput.rs: boto3's managed transfer against the same S3 server.

usage: s3_anchor.py FILE BUCKET KEY REPEATS
Uploads FILE with `upload_file` and downloads it back with `download_file` (boto3's default
TransferConfig: multipart, 10 threads, 8 MiB chunks), REPEATS times; the endpoint and credentials
come from the AWS_* environment (scripts/s3-server.sh). Prints the median seconds of each as one JSON
object on the last line.
"""
import json
import os
import statistics
import sys
import time

import boto3


def main():
    path, bucket, key, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    back = path + ".back"
    up, down = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        s3.upload_file(path, bucket, key)
        up.append(time.perf_counter() - t)
        t = time.perf_counter()
        s3.download_file(bucket, key, back)
        down.append(time.perf_counter() - t)
        os.remove(back)
    s3.delete_object(Bucket=bucket, Key=key)
    print(json.dumps({"upload": statistics.median(up), "download": statistics.median(down)}))


if __name__ == "__main__":
    main()
