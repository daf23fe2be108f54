"""The independent client of the blob tests: the Azure SDK for Python against Azurite.

Usage: azcheck.py ENDPOINT CONTAINER COMMAND [ARGS]
  create               create the container (ok if it exists)
  list                 one line per blob: NAME SIZE SHA256 ETAG
  get NAME FILE        download a blob into FILE
  put NAME FILE        upload FILE as a blob
  upload-dir DIR PREFIX CONCURRENCY
                       upload every file of DIR as PREFIX+NAME, all files at once, each
                       with CONCURRENCY parallel block uploads; prints the seconds taken
  download-dir PREFIX DIR CONCURRENCY
                       download every blob under PREFIX into DIR (names without the
                       prefix), all at once, each with CONCURRENCY parallel range
                       downloads; prints the seconds taken
  sas                  prints a read-write SAS URL of the container (for rclone)
ENDPOINT is the account URL, e.g. http://127.0.0.1:10000/devstoreaccount1.
"""
import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

# Azurite's well-known account (public, the same in every Azurite).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def main():
    endpoint, container, cmd, *args = sys.argv[1:]
    conn = (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
        f"BlobEndpoint={endpoint};"
    )
    svc = BlobServiceClient.from_connection_string(conn)
    c = svc.get_container_client(container)
    if cmd == "create":
        try:
            c.create_container()
        except ResourceExistsError:
            pass
    elif cmd == "list":
        for b in c.list_blobs():
            data = c.download_blob(b.name).readall()
            print(b.name, b.size, hashlib.sha256(data).hexdigest(), b.etag)
    elif cmd == "get":
        name, path = args
        with open(path, "wb") as f:
            f.write(c.download_blob(name).readall())
    elif cmd == "put":
        name, path = args
        with open(path, "rb") as f:
            c.upload_blob(name, f, overwrite=True)
    elif cmd == "sas":
        from datetime import datetime, timedelta, timezone

        token = generate_container_sas(
            ACCOUNT,
            container,
            account_key=KEY,
            permission=ContainerSasPermissions(read=True, write=True, delete=True, list=True, add=True, create=True),
            expiry=datetime.now(timezone.utc) + timedelta(days=1),
        )
        print(f"{endpoint}/{container}?{token}")
    elif cmd == "upload-dir":
        src, prefix, conc = args
        names = sorted(os.listdir(src))

        def upload(name):
            with open(os.path.join(src, name), "rb") as f:
                c.upload_blob(prefix + name, f, overwrite=True, max_concurrency=int(conc))

        t0 = time.monotonic()
        with ThreadPoolExecutor(max(1, len(names))) as ex:
            list(ex.map(upload, names))
        print(f"{time.monotonic() - t0:.3f}")
    elif cmd == "download-dir":
        prefix, dst, conc = args
        os.makedirs(dst, exist_ok=True)
        names = [b.name for b in c.list_blobs(name_starts_with=prefix)]

        def download(name):
            with open(os.path.join(dst, name[len(prefix):]), "wb") as f:
                c.download_blob(name, max_concurrency=int(conc)).readinto(f)

        t0 = time.monotonic()
        with ThreadPoolExecutor(max(1, len(names))) as ex:
            list(ex.map(download, names))
        print(f"{time.monotonic() - t0:.3f}")
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
