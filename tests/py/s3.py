"""Independent S3 client for the adce end-to-end tests (boto3, not the server's SDK).

Usage: python s3.py ENDPOINT COMMAND ARGS...

Commands:
  create-bucket BUCKET           create a bucket
  list BUCKET PREFIX             print a JSON array of {"key", "size"} under PREFIX
  dump BUCKET PREFIX             print a JSON object {key: {"size", "body_hex"}} under PREFIX
  get BUCKET KEY                 write the object's bytes to stdout; exit 4 if it does not exist
  put BUCKET KEY FILE            upload FILE's bytes as KEY
  delete BUCKET KEY...           delete the keys
  upload-dir BUCKET DIR          upload every file under DIR, keyed by its path relative to DIR;
                                 print how many
  multipart-uploads BUCKET       print a JSON array of the keys of unfinished multipart uploads

Credentials and region come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION); the harness sets them for moto.
"""

import json
import os
import sys

import boto3
from botocore.config import Config

MISSING_EXIT = 4


def client(endpoint):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )


def objects(s3, bucket, prefix):
    """Every object under prefix, following continuation tokens."""
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            yield item


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    endpoint, command, args = argv[1], argv[2], argv[3:]
    s3 = client(endpoint)
    if command == "create-bucket" and len(args) == 1:
        s3.create_bucket(Bucket=args[0])
    elif command == "list" and len(args) == 2:
        listed = [{"key": o["Key"], "size": o["Size"]} for o in objects(s3, args[0], args[1])]
        json.dump(listed, sys.stdout)
    elif command == "dump" and len(args) == 2:
        out = {}
        for o in objects(s3, args[0], args[1]):
            body = s3.get_object(Bucket=args[0], Key=o["Key"])["Body"].read()
            out[o["Key"]] = {"size": o["Size"], "body_hex": body.hex()}
        json.dump(out, sys.stdout)
    elif command == "get" and len(args) == 2:
        try:
            body = s3.get_object(Bucket=args[0], Key=args[1])["Body"].read()
        except s3.exceptions.NoSuchKey:
            return MISSING_EXIT
        sys.stdout.buffer.write(body)
    elif command == "put" and len(args) == 3:
        with open(args[2], "rb") as f:
            s3.put_object(Bucket=args[0], Key=args[1], Body=f.read())
    elif command == "delete" and len(args) >= 2:
        s3.delete_objects(
            Bucket=args[0], Delete={"Objects": [{"Key": k} for k in args[1:]], "Quiet": True}
        )
    elif command == "upload-dir" and len(args) == 2:
        count = 0
        for root, _dirs, files in os.walk(args[1]):
            for name in sorted(files):
                path = os.path.join(root, name)
                key = os.path.relpath(path, args[1]).replace(os.sep, "/")
                with open(path, "rb") as f:
                    s3.put_object(Bucket=args[0], Key=key, Body=f.read())
                count += 1
        print(count)
    elif command == "multipart-uploads" and len(args) == 1:
        reply = s3.list_multipart_uploads(Bucket=args[0])
        json.dump([u["Key"] for u in reply.get("Uploads", [])], sys.stdout)
    else:
        print(f"s3.py: unknown command or wrong arguments: {command} {args}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
