"""TFDS data sets, prepared in the array_record format (random access), offline where possible.

A data set that is not prepared yet is prepared from `<data_dir>/downloads/manual/` when the user put
its original files there, else downloaded. Before a download, the host the data set's own URLs name
(or the proxy that would carry the request) is probed, so a machine without network gets a clear
error in seconds instead of TFDS's retries; TFDS's own errors are wrapped the same way.
"""

from __future__ import annotations

import os
import socket
import sys
import tarfile
import urllib.parse
import urllib.request

import ml_collections
from etils import epath

from pivot_jax.errors import DataError, first_line

PROBE_TIMEOUT_SECONDS = 10.0
# The archives a data set's TFDS builder reads from the manual dir: checked (present, whole) before a
# preparation of hours starts, since TFDS prepares what it finds and leaves a missing split out.
# TFDS never downloads these data sets: the archives come from their publisher.
MANUAL_ARCHIVES = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}
MANUAL_SOURCES = {"imagenet2012": ("image-net.org, after registering. For mixed-resolution (MR) training, also make "
                                   "the box file from the ILSVRC box XML archives: python -m pivot_jax.boxes_from_xml "
                                   "(README, ImageNet)")}


# The archive whose members are the classes (one `<synset>.tar` each), for the class count check.
CLASS_ARCHIVES = {"imagenet2012": "ILSVRC2012_img_train.tar"}
_TAR_BLOCK = 512


def check_manual_archives(name: str, manual_dir, num_classes: int | None = None) -> None:
    """A DataError naming the first archive of `name` that is missing, unreadable, truncated (inside a
    member, or exactly at a member's end, where tar's two zero end-of-archive blocks are missing), or
    that holds other than `num_classes` classes. `manual_dir` may be on any file system epath reads."""
    manual_dir = epath.Path(manual_dir)
    expected = MANUAL_ARCHIVES.get(name, ())
    for file_name in expected:
        path = manual_dir / file_name
        if not path.is_file():
            raise DataError(f"{name}: {file_name} is missing from {manual_dir}. TFDS never downloads {name}; it "
                            f"prepares it from {' and '.join(expected)} put there (or in --config.data.manual_dir): "
                            f"they come from {MANUAL_SOURCES[name]}")
        size = path.stat().length
        members, end = 0, 0
        try:
            with path.open("rb") as file, tarfile.open(fileobj=file, mode="r:") as archive:
                for member in archive:  # headers only: the data is skipped over, not read
                    members += 1
                    end = member.offset_data + -(-member.size // _TAR_BLOCK) * _TAR_BLOCK
                    if member.offset_data + member.size > size:
                        raise DataError(f"{name}: {path} is truncated: its member {member.name} ends at byte "
                                        f"{member.offset_data + member.size:,}, the file has {size:,} bytes")
                file.seek(end)
                marker = file.read(2 * _TAR_BLOCK)
        except tarfile.TarError as error:
            raise DataError(f"{name}: {path} is not a readable tar archive ({error})") from None
        if marker != bytes(2 * _TAR_BLOCK):
            raise DataError(f"{name}: {path} is truncated: it ends after its member {members} at byte {size:,}, "
                            "without tar's end-of-archive blocks (a copy cut short?)")
        if num_classes is not None and CLASS_ARCHIVES.get(name) == file_name and members != num_classes:
            raise DataError(f"{name}: {path} holds {members} classes (one archive each), config.data.num_classes "
                            f"is {num_classes}; is it the whole {file_name}?")


def network_reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_SECONDS) -> bool:
    """Whether a TCP connection to `host:port` opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def download_endpoint(urls) -> tuple[str, int] | None:
    """(host, port) a download of `urls` first connects to: the scheme's proxy where one is set
    (and the host is not in no_proxy), else the first URL's host. None without URLs."""
    urls = list(urls)
    if not urls:
        return None
    url = urllib.parse.urlsplit(urls[0])
    default_port = 443 if url.scheme == "https" else 80
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_url.hostname, proxy_url.port or (443 if proxy_url.scheme == "https" else 80)
    return url.hostname, url.port or default_port


WAIT_MESSAGE_EVERY_SECONDS = 300.0
WAIT_POLL_SECONDS = 10.0


def _process_index() -> int:
    import jax

    return jax.process_index()


def _array_record_builder(data: ml_collections.ConfigDict):
    """TFDS's builder of `config.data`'s data set in its data dir (config, then $TFDS_DATA_DIR)."""
    import tensorflow_datasets as tfds

    return tfds.builder(data.name, data_dir=data.data_dir or os.environ.get("TFDS_DATA_DIR"),
                        file_format="array_record")


def _wait_for_process_0(data: ml_collections.ConfigDict, where: str):
    """The data set once process 0 has prepared it. Several hosts preparing one data set at once race
    (TFDS renames into the same directory) and all lose hours of work; so only process 0 prepares,
    and the others wait here. A process 0 that fails ends the run (jax.distributed's heartbeats)."""
    import time

    from absl import logging

    started, said = time.monotonic(), -WAIT_MESSAGE_EVERY_SECONDS
    while True:
        dataset = _array_record_builder(data)  # anew each time: a builder reads its info when made
        if dataset.is_prepared():
            return dataset
        waited = time.monotonic() - started
        if waited - said >= WAIT_MESSAGE_EVERY_SECONDS:
            said = waited
            logging.warning("Waiting for process 0 to prepare %s in %s (%d min so far); `launch/tpu/pod.sh prepare` "
                            "or `python -m pivot_jax.prepare` prepares it once ahead of training.",
                            data.name, where, waited // 60)
        time.sleep(WAIT_POLL_SECONDS)


def builder(data: ml_collections.ConfigDict):
    """The prepared TFDS builder of `config.data`; prepares it (offline from the manual dir) if needed."""
    import tensorflow_datasets as tfds

    try:
        dataset = _array_record_builder(data)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise DataError(
            f"config.data.name: {data.name!r} is not a TFDS data set ({str(error).splitlines()[0]}); "
            "use a TFDS name or 'folder' with config.data.folder"
        ) from None
    manual_dir = epath.Path(data.manual_dir or epath.Path(dataset.data_dir_root) / "downloads" / "manual")
    how_offline = (
        f"Where it is prepared elsewhere, point at it with TFDS_DATA_DIR=DIR or --config.data.data_dir=DIR. "
        f"To prepare it offline, put the data set's original files in {manual_dir} (or point "
        f"--config.data.manual_dir at them) and run again: TFDS then prepares it without the network."
    )
    if dataset.is_prepared():
        if dataset.info.file_format is not None and dataset.info.file_format.value != "array_record":
            raise DataError(
                f"{data.name} is prepared in {dataset.data_dir} as {dataset.info.file_format.value}; "
                "random access needs array_record. Convert it with `tfds convert_format "
                f"--dataset_version_dir={dataset.data_dir} --out_file_format=array_record`, or prepare "
                "it again in another --config.data.data_dir."
            )
        return dataset
    if _process_index() > 0:
        return _wait_for_process_0(data, dataset.data_dir)
    has_manual = manual_dir.is_dir() and any(manual_dir.iterdir())
    if data.name in MANUAL_ARCHIVES:  # never downloadable: its archives must be there, whatever else is
        check_manual_archives(data.name, manual_dir, data.num_classes)
    elif not has_manual:
        if not data.download:
            raise DataError(
                f"{data.name} is not prepared in {dataset.data_dir} and config.data.download is False. "
                + how_offline
            )
        endpoint = download_endpoint(getattr(dataset, "url_infos", None) or {})
        if endpoint is not None and not network_reachable(*endpoint):
            raise DataError(
                f"{data.name} is not prepared in {dataset.data_dir} and cannot be downloaded: "
                f"{endpoint[0]}:{endpoint[1]} is unreachable. " + how_offline
            )
    from absl import logging

    logging.info("Preparing %s in %s%s.", data.name, dataset.data_dir,
                 f" from the files in {manual_dir}" if has_manual else " (downloading it)")
    if sys.stderr.isatty():  # TFDS's own bars, on a terminal; in a log file they would flood it
        tfds.enable_progress_bar()
    else:
        tfds.disable_progress_bar()
    try:
        dataset.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
        )
    except Exception as error:  # TFDS raises many kinds; all mean the same to the user
        raise DataError(f"preparing {data.name} in {dataset.data_dir} failed: {first_line(error)}. "
                        + how_offline) from None
    return dataset
