"""The NCCID access groups as prefix rules, rendered for SeaweedFS identities and for AWS IAM policies.

One table, two renderings, so a local deployment and an AWS one grant exactly the same access. Pure functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nccid.errors import GroupError

#: the S3 identity of the central team (the server's administrator): the audit names it "central team"
ADMIN_NAME = "nccid-admin"

_UPLOADER = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


@dataclass(frozen=True)
class Rule:
    """Prefixes a group may read (GET), list, and write (PUT). '' means the whole bucket."""

    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    description: str = ""


def _training(modality: str) -> Rule:
    prefixes = (f"training/{modality}/", f"training/{modality}-metadata/", "training/data/")
    return Rule(read=prefixes, description=f"training {modality} images, their metadata and the clinical data")


GROUPS: dict[str, Rule] = {
    "uploader": Rule(write=("raw-{uploader}/",), description="a site: write-only to its own raw prefix"),
    "etl": Rule(
        read=("",),
        write=("training/", "validation/", "reports/"),
        description="the loader: read everything, write the processed layout and run reports",
    ),
    "processing": Rule(
        read=("training/", "validation/", "stats/"),
        write=("stats/",),
        description="statistics: read the processed layout, write the statistics outputs",
    ),
    "processed-reader": Rule(read=("training/", "validation/"), description="read all processed data"),
    "training-ct": _training("ct"),
    "training-mri": _training("mri"),
    "training-xray": _training("xray"),
    "training-all": Rule(read=("training/",), description="read the whole training set"),
    "validation-all": Rule(read=("validation/",), description="read the held-out validation set (validators)"),
    "auditor": Rule(read=("reports/", "stats/", "audit/"), description="read load reports, statistics, audit"),
}


def prefixes(group: str, uploader: str | None = None) -> Rule:
    """The group's rule with the uploader's own prefix filled in."""
    if group not in GROUPS:
        raise GroupError(f"unknown group {group!r}; groups are: {', '.join(GROUPS)}")
    rule = GROUPS[group]
    if group == "uploader":
        if not uploader or not _UPLOADER.fullmatch(uploader):
            raise GroupError("the uploader group needs an uploader name (lower-case letters, digits, '.', '_', '-')")
        return Rule(write=tuple(p.format(uploader=uploader) for p in rule.write), description=rule.description)
    return rule


def seaweed_actions(group: str, bucket: str, uploader: str | None = None) -> list[str]:
    """SeaweedFS identity actions. Prefix scopes need the wildcard form `Read:bucket/prefix/*`."""
    rule = prefixes(group, uploader)

    def scoped(verb: str, prefix: str) -> str:
        return f"{verb}:{bucket}" if prefix == "" else f"{verb}:{bucket}/{prefix}*"

    actions = [scoped(v, p) for p in rule.read for v in ("Read", "List")]
    actions += [scoped("Write", p) for p in rule.write]
    return actions


def iam_policy(group: str, bucket: str, uploader: str | None = None) -> dict:
    """The same rule as an AWS IAM policy document, for a deployment on AWS S3."""
    rule = prefixes(group, uploader)
    arn = f"arn:aws:s3:::{bucket}"
    statements: list[dict] = []
    if rule.read:
        if "" in rule.read:
            statements.append({"Sid": "ListBucket", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": arn})
            statements.append({"Sid": "Read", "Effect": "Allow", "Action": "s3:GetObject", "Resource": f"{arn}/*"})
        else:
            statements.append(
                {
                    "Sid": "ListPrefixes",
                    "Effect": "Allow",
                    "Action": "s3:ListBucket",
                    "Resource": arn,
                    "Condition": {"StringLike": {"s3:prefix": [f"{p}*" for p in rule.read]}},
                }
            )
            statements.append(
                {
                    "Sid": "Read",
                    "Effect": "Allow",
                    "Action": "s3:GetObject",
                    "Resource": [f"{arn}/{p}*" for p in rule.read],
                }
            )
    if rule.write:
        statements.append(
            {
                "Sid": "Write",
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
                "Resource": [f"{arn}/{p}*" for p in rule.write],
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}
