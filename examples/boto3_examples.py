"""The NCCID data-access guide's boto3 examples, unchanged: list, download, read a DICOM header, load JSON.

Needs only your credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and, outside AWS, AWS_ENDPOINT_URL.
Usage: python boto3_examples.py DEST
"""

import json
import os
import sys
from io import BytesIO

import boto3
import pydicom

BUCKET_NAME = "nccid-data-warehouse-prod"
s3 = boto3.client("s3")


def list_objects(prefix):
    """Print key, size and last-modified of every object below a prefix."""
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=BUCKET_NAME, Prefix=prefix):
        for obj in page.get("Contents", []):
            print(obj["Key"], obj["Size"], obj["LastModified"])


def download_prefix(prefix, dest):
    """Download every object below a prefix, skipping files already there with the same size."""
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=BUCKET_NAME, Prefix=prefix):
        for obj in page.get("Contents", []):
            target = os.path.join(dest, os.path.relpath(obj["Key"], prefix))
            if os.path.exists(target) and os.path.getsize(target) == obj["Size"]:
                print("skipped", obj["Key"])
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            s3.download_file(BUCKET_NAME, obj["Key"], target)
            print("downloaded", obj["Key"])


def read_dicom_header(key):
    """Read a DICOM header in memory, without the pixel data."""
    obj = s3.get_object(Bucket=BUCKET_NAME, Key=key)
    return pydicom.dcmread(BytesIO(obj["Body"].read()), stop_before_pixels=True)


def load_clinical_json(key):
    obj = s3.get_object(Bucket=BUCKET_NAME, Key=key)
    return json.loads(obj["Body"].read())


if __name__ == "__main__":
    dest = sys.argv[1]
    list_objects("training/data/")
    download_prefix("training/data/", dest)
    download_prefix("training/data/", dest)  # a second time: everything is skipped
    first_image = next(
        o["Key"]
        for o in s3.list_objects_v2(Bucket=BUCKET_NAME, Prefix="training/xray/")["Contents"]
        if o["Key"].endswith(".dcm")
    )
    header = read_dicom_header(first_image)
    print("header", first_image, header.PatientID, header.Modality, "PixelData" in header)
    first_record = s3.list_objects_v2(Bucket=BUCKET_NAME, Prefix="training/data/")["Contents"][0]["Key"]
    record = load_clinical_json(first_record)
    print("record", first_record, record["Pseudonym"], record["SubmittingCentre"])
