"""The independent client of the S3 blob tests: boto3 against a moto server.

Usage: s3check.py ENDPOINT BUCKET COMMAND
  create               create the bucket (ok if it exists)
  list                 one line per object: KEY SIZE SHA256 ETAG
Credentials: moto accepts any; the tests use the ones in S3_KEY_ID / S3_SECRET below.
"""
import hashlib
import sys

import boto3

S3_KEY_ID = "spooltest"
S3_SECRET = "spooltestsecret"


def main():
    endpoint, bucket, cmd = sys.argv[1:4]
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_KEY_ID,
        aws_secret_access_key=S3_SECRET,
    )
    if cmd == "create":
        try:
            s3.create_bucket(Bucket=bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
    elif cmd == "list":
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                data = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                print(o["Key"], o["Size"], hashlib.sha256(data).hexdigest(), o["ETag"].strip('"'))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
