#!/usr/bin/env bash
# The NCCID data-access guide's AWS CLI examples, unchanged. Needs only your credentials
# (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and, outside AWS, AWS_ENDPOINT_URL.
set -euo pipefail

# One modality:
aws s3 sync s3://nccid-data-warehouse-prod/training/ct ct

# Everything in the training set, folder by folder:
for d in data ct ct-metadata mri mri-metadata xray xray-metadata; do
    aws s3 sync s3://nccid-data-warehouse-prod/training/$d $d
done
