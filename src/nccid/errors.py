"""Every exception the nccid library raises on purpose, in one place (as pydicom keeps its own in `errors.py`).

All derive from :class:`NccidError`, so a shell (the CLI, the portal, the demo) needs one handler: it prints
``str(exc)`` (one line that names the file, key, row, field or tag and the reason, never an identifier) and
exits with :attr:`NccidError.exit_code`. Each class's docstring says what went wrong and how to recover.

The classes keep the built-in base they had before (``ValueError``, ``PermissionError``, ...) so that code which
caught those keeps working. The modules that raise them re-export them under their old names.
"""

from __future__ import annotations


class NccidError(Exception):
    """Base of every error nccid raises on purpose. The message is one line, safe to show and to log."""

    #: the process exit code a shell uses for this error (1: the input or state is wrong; 2: usage)
    exit_code = 1


class HasReason(NccidError):
    """An error carrying a `reason` that is recorded with the object it concerns (held, quarantined)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- object stores --------------------------------------------------------------------------------------
class StoreError(NccidError):
    """An object-store operation failed; the message names the key. Check the store's URL, credentials and
    server, then run the same command again: every stage is safe to repeat."""


class ObjectNotFound(StoreError):
    """The key does not exist. List its prefix (`nccid ls`) to see what is there."""


class ObjectExists(StoreError):
    """A create-only write found the key already present. Processed objects are never overwritten: a
    corrected record arrives as a new dated file."""


class InvalidKey(StoreError):
    """The key could escape its prefix or is not a valid object name. Use forward slashes, no `..`."""


class StoreMissing(StoreError):
    """The store named does not exist (a mistyped path or bucket). Check the path, or create the store with a
    command that makes one (`nccid synth`, `nccid demo`, or `config.json` written by the central team)."""


class NotDicom(StoreError):
    """The object asked for as DICOM is not a DICOM file (a JSON record, say). Read it as bytes instead."""


class ServerError(NccidError, RuntimeError):
    """The managed S3 server could not be started, reached or stopped, or died; the message says why. Look at
    the server's log in its home folder, then start it again."""


class SyncError(StoreError):
    """A file could not be fetched intact, or its destination is not a writable folder; the message names
    the key or path. Run the same sync again: what arrived intact is not fetched twice."""


class UploadError(StoreError):
    """An object did not arrive intact; the message names the file. Run the same upload again: it resumes
    under the same date and skips what was verified."""


# -- the warehouse -------------------------------------------------------------------------------------
class ConfigError(NccidError, ValueError):
    """`config.json` is missing or malformed; the message names the field. Fix the file and run again."""


class LayoutError(NccidError, ValueError):
    """A key or identifier does not fit the layout; the message says why. Move the object to where the
    layout expects it (see the README's layouts)."""


class ImageRejected(HasReason, ValueError):
    """The file cannot be filed; `reason` names the tag or defect. The image stays where the site put it,
    quarantined; the site fixes and re-sends it."""


class ClinicalRejected(HasReason, ValueError):
    """The clinical record is held; `reason` names the file and field. The site sends a corrected record
    under a new upload date."""


class CatalogError(NccidError):
    """The catalog cannot be used with this store (it belongs to another store, it is busy with another
    load, it is empty while the store holds processed data); the message says what to do, usually
    `nccid warehouse rebuild-catalog`."""


class CatalogBusy(CatalogError):
    """Another load holds the catalog; the message names its run. Wait for it to finish and run again."""


# -- access --------------------------------------------------------------------------------------------
class GroupError(NccidError, ValueError):
    """Unknown access group, or an uploader group without a valid uploader name; `nccid access policy`
    lists the groups."""


class GrantError(NccidError, ValueError):
    """A grant request that cannot be honoured; the message says why (unknown key, past expiry, ...)."""


# -- the hospital side ---------------------------------------------------------------------------------
class IdentifierError(NccidError, ValueError):
    """The number is not a valid NHS / CHI number; the message says why (never the number). Correct the
    sheet or the PACS record."""


class VaultError(NccidError, PermissionError):
    """A key or vault operation was refused; the message says why (never which number). Check the key file
    and that the actor is a named data manager."""


class DeidHeld(HasReason, ValueError):
    """The object is held back at the site, not uploaded; `reason` says why (a burned-in annotation, an SOP
    class outside the programme, ...). It needs a person's review before it can be sent."""


class SheetError(NccidError, ValueError):
    """A clinical sheet cannot be read at all (missing, empty, not CSV or XLSX, an unknown encoding); the
    message names the file. Save it again from the template and retry."""


class DemoFailed(NccidError):
    """A stage of `nccid demo` did not end as the demo expects (the PACS could not send, the gate found an
    identifier); the message names the stage. Nothing outside the demo's own folder was touched."""


class UsageError(NccidError):
    """The options given do not fit together or a value is out of range; the message names the option's
    value. Nothing was changed."""

    exit_code = 2


class NodeError(NccidError, RuntimeError):
    """The site DICOM node stopped because one of its processes died; its other processes were stopped and
    the spool emptied (the PACS resends what was not answered). Look at the service log and start it again."""


# -- validation of AI models ---------------------------------------------------------------------------
class SubmissionError(NccidError, ValueError):
    """A model submission cannot be accepted: its manifest is missing, malformed or out of range; the message
    names the file and field. The vendor fixes the manifest (see examples/models/README.md) and submits again."""


class CohortError(NccidError, ValueError):
    """No usable validation cohort for the model's intended use (no validation data, a modality the warehouse
    does not hold, no positives or no negatives); the message says which. Load the warehouse or widen the
    intended use."""


class SandboxError(NccidError, RuntimeError):
    """The sandbox cannot be set up on this machine (bubblewrap missing, namespaces refused); the message says
    what. Install Debian's `bubblewrap` and run as root or as a user allowed user namespaces."""


class ValidationRunError(NccidError):
    """A validation run cannot go ahead or be released (unknown submission or run, a sealed run before a
    passing dry run, a report released twice); the message says which and what to do."""


class FrozenCohortAltered(ValidationRunError):
    """The files of a frozen cohort, hashed during a sealed run, are not the ones recorded when it was first run
    (see nccid/validation/frozen.py). The run stops without a report and the cohort is dropped (audited): run
    the sealed run again to freeze the cohort anew from the warehouse, and find out who changed the workspace."""


# -- the portal ----------------------------------------------------------------------------------------
class PortalError(NccidError):
    """A portal account or form action was refused; the message says why in one line (never a password,
    token or identifier). Correct the form and submit it again."""
