"""Blind responses: the reference model answers each prompt without its image.

Blind Preference Optimization treats such an answer as one more rejected response: it
ignores the image the instruction is about. For every preference record the engine
answers a blind version of the prompt, and the answer is appended to ``rejected`` with
source ``"blind"``. Three ways to blind a prompt:

``remove``  the image and its ``<image>`` token are dropped (the paper's way);
``blank``   the image is replaced by a plain grey picture;
``text``    the original text-only prompt (``meta["text_prompt"]``) is asked instead: a whole
            LLaVA-v1 conversation as the released files write it, earlier turns included,
            or a bare instruction that replaces the last user turn.

Generation is resumable: answers go to a side file of response records keyed by id
(``<out>.blind-responses.jsonl``); the records file is written atomically once every
answer is there. The output is ordinary preference records that train unchanged. Resume
is keyed by content as in :mod:`mmsafe.generate.runs`: the mode, the engine and decoding
settings (and, in ``blank`` mode, the image root) are checked against ``<out>.config.yaml``;
a record whose prompt (or ``meta.text_prompt`` in ``text`` mode) changed is asked again. A
record the engine could not answer leaves the records file unwritten and is listed in
``<out>.blind-responses.jsonl.failed.jsonl``; a rerun asks it again.

The records file says where its images are, so the next stage needs no image root: when
the image root was the data file's folder (the default) and every image lies under the
output's folder, each ``image`` is rewritten relative to the output's folder
(:func:`rebase_images`, which checks that each new path resolves, confined to the new
root, to the same file as the old one did under the old root). Otherwise (the images lie
elsewhere, a path is refused under its root, or an image root was given, which a caller
may pass again to the next stage) the paths are kept and
``<out>.image-root.yaml`` names the old root (:func:`mmsafe.data.inputs.write_image_root_sidecar`).
An absolute path or one with ``..`` would be refused by the image-root confinement
(:func:`mmsafe.data.images.resolve_image_path`), so neither is ever written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mmsafe.data.conversations import prompt_messages, without_image, without_image_tokens
from mmsafe.data.inputs import image_root_sidecar_path, open_inputs, source_name, write_image_root_sidecar
from mmsafe.data.outputs import check_output_is_not_an_input
from mmsafe.data.records import PreferenceRecord, read_response_records, write_records
from mmsafe.errors import ConfigError, DataError, MmsafeError
from mmsafe.generate.engine import DecodingParams, Engine, GenerationRequest, request_from_record
from mmsafe.generate.runs import (
    DEFAULT_BATCH_SIZE,
    config_path_for,
    record_input_hash,
    run_requests,
)

logger = logging.getLogger(__name__)

BLIND_MODES = ("remove", "blank", "text")
BLIND_SOURCE = "blind"
#: The stand-in picture of ``blank`` mode: mid-grey, the size LLaVA-1.5's vision tower takes.
BLANK_SIZE = (336, 336)
BLANK_COLOUR = (128, 128, 128)


@dataclass
class BlindSummary:
    """What :func:`make_blind` did."""

    out_path: Path
    responses_path: Path
    records: int
    generated: int
    already_done: int
    empty: list[str]
    """Ids whose blind answer was empty: those records keep only their other rejected responses."""
    seconds: float
    release_rows_path: Path | None = None
    release_rows: int = 0
    image_root: Path | None = None
    """Where the records' images are, when that is not the output's folder (named in ``image_root_sidecar``)."""
    image_root_sidecar: Path | None = None
    """``<out>.image-root.yaml``, when it names :attr:`image_root`."""
    images_rebased: bool = False
    """Whether the image paths were rewritten relative to the output's folder."""

    def summary(self) -> str:
        text = (
            f"{self.records} records with a blind rejected response written to {self.out_path} "
            f"({self.generated} generated in {self.seconds:.1f} s, {self.already_done} already done)"
        )
        if self.empty:
            text += f"; {len(self.empty)} empty blind answers not added (ids: {', '.join(self.empty[:5])}{', ...' if len(self.empty) > 5 else ''})"
        if self.release_rows_path is not None:
            text += f"; {self.release_rows} released-format rows written to {self.release_rows_path}"
        if self.images_rebased:
            text += f"; image paths rewritten relative to {self.out_path.parent}"
        if self.image_root is not None:
            where = (
                f" (named in {self.image_root_sidecar}, so later stages find them)"
                if self.image_root_sidecar is not None
                else ""
            )
            text += f"; image paths are relative to {self.image_root}{where}"
        return text


def responses_path_for(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".blind-responses.jsonl")


def blind_request(
    record: PreferenceRecord, mode: str, image_root: str | Path | None, *, file: str | None = None
) -> GenerationRequest:
    """The request that asks ``record``'s prompt blind, in ``mode``."""
    variant = f"blind-{mode}"
    if mode == "remove":
        return GenerationRequest(
            id=record.id, messages=without_image(record.messages), image=None, variant=variant, meta=dict(record.meta)
        )
    if mode == "blank":
        from mmsafe.data.images import blank_image

        if not record.has_image_token:
            # A text-only record has no image to blank: it is asked as it is.
            return request_from_record(record, image_root, variant=variant)
        return GenerationRequest(
            id=record.id,
            messages=list(record.messages),
            image=blank_image(BLANK_SIZE, BLANK_COLOUR),
            variant=variant,
            meta=dict(record.meta),
        )
    if mode == "text":
        text_prompt = record.meta.get("text_prompt")
        if not isinstance(text_prompt, str) or not text_prompt.strip():
            raise DataError(
                f"blind mode 'text' needs the original text-only instruction, got {text_prompt!r}; use --mode remove or blank",
                file=file,
                record=record.id,
                field="meta.text_prompt",
            )
        try:
            messages = prompt_messages(
                text_prompt, history=record.messages[:-1], record=record.id, field="meta.text_prompt"
            )
        except DataError as error:
            raise error.at(file=file) from None
        return GenerationRequest(
            id=record.id, messages=without_image_tokens(messages), image=None, variant=variant, meta=dict(record.meta)
        )
    raise ConfigError(f"mode: expected one of {', '.join(BLIND_MODES)}, got {mode!r}")


def check_records(records: list[PreferenceRecord], mode: str, *, file: str | None = None) -> None:
    """Fail on the first record that cannot be asked blind in ``mode`` (before any model is loaded)."""
    if mode not in BLIND_MODES:
        raise ConfigError(f"mode: expected one of {', '.join(BLIND_MODES)}, got {mode!r}")
    if mode == "text":
        for record in records:
            blind_request(record, mode, None, file=file)


def add_blind_response(record: PreferenceRecord, response: str) -> PreferenceRecord:
    """A copy of ``record`` with ``response`` appended as a rejected response from source ``blind``."""
    return PreferenceRecord(
        id=record.id,
        messages=list(record.messages),
        chosen=record.chosen,
        rejected=[*record.rejected, response],
        image=record.image,
        rejected_sources=[*record.rejected_sources, BLIND_SOURCE],
        meta=dict(record.meta),
    )


def rebase_images(
    records: list[PreferenceRecord], image_root: str | Path, out_dir: str | Path
) -> list[PreferenceRecord] | None:
    """``records`` with each image path relative to ``out_dir`` instead of ``image_root``, or
    None when some image cannot be named that way.

    A new path is used only when it has no ``..`` (the image lies under ``out_dir``) and,
    resolved under ``out_dir`` with the usual confinement, leads to the same real file as
    the old path under ``image_root``: the records reach exactly the files they reached
    before. A path refused under its own root (absolute, ``..``, a symlink out) gives None,
    so the record keeps it and its root, and the next stage refuses it as before.
    """
    from mmsafe.data.images import resolve_image_path

    out_dir = Path(out_dir)
    rebased = []
    for record in records:
        if record.image is None:
            rebased.append(record)
            continue
        try:
            old = resolve_image_path(image_root, record.image)
            relative = os.path.relpath(os.path.abspath(old), os.path.abspath(out_dir))
        except (DataError, ValueError):  # refused under its root; or on another drive (Windows)
            return None
        if os.path.isabs(relative) or relative.split(os.sep)[0] == os.pardir:
            return None
        relative = Path(relative).as_posix()
        try:
            same = resolve_image_path(out_dir, relative).resolve() == old.resolve()
        except DataError:
            return None
        if not same:
            return None
        rebased.append(dataclasses.replace(record, image=relative))
    return rebased


def make_blind(
    engine: Engine,
    data: str | Path | Iterable[PreferenceRecord],
    out_path: str | Path,
    *,
    mode: str = "remove",
    image_root: str | Path | None = None,
    params: DecodingParams | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    write_release_rows: str | Path | None = None,
    limit: int | None = None,
    format_name: str | None = None,
    source: str | None = None,
) -> BlindSummary:
    """Add a blind rejected response, answered by ``engine`` (the reference model), to every record.

    Args:
        engine: the reference model's engine.
        data: preference records (a file in any known format, or records).
        out_path: the preference records JSONL to write.
        mode: ``remove`` (default, the paper's), ``blank`` or ``text``.
        image_root: where record images live (default: the data file's folder); only
            ``blank`` mode on text-only records and nothing else reads images.
        params: decoding settings (default: greedy, 256 new tokens).
        batch_size: records per written batch of the side file.
        write_release_rows: also write the released MMSafe-PO JSON form here (one row
            per rejected response, the prompt repeated).
        limit: only the first ``limit`` records.
        format_name: the data file's format (default: detected).
        source: where records passed in came from (a file name), for the config and errors.
    """
    if mode not in BLIND_MODES:
        raise ConfigError(f"mode: expected one of {', '.join(BLIND_MODES)}, got {mode!r}")
    if mode in ("remove", "text") and not getattr(engine, "accepts_text_only", True):
        raise ConfigError(
            f"mode {mode}: {getattr(engine, 'name', 'the model')} takes no prompt without an image; blind it with --mode blank"
        )
    params = params or DecodingParams()
    started = time.perf_counter()
    out_path = Path(out_path)
    for written in (out_path, responses_path_for(out_path), write_release_rows):
        if written is not None:
            check_output_is_not_an_input(written, [data, source, image_root])
    inputs = open_inputs(data, limit=limit, format_name=format_name, image_root=image_root, source=source)
    records, root = inputs.records, inputs.image_root
    file = source_name(data, source)
    check_records(records, mode, file=file)
    if not records:
        raise DataError("no records to answer blind (expected at least one preference record)", file=file)
    responses_path = responses_path_for(out_path)
    # Only blank mode looks images up (text-only records asked as they are).
    hash_root = root if mode == "blank" else None
    settings: dict = {"blind.mode": mode}
    if hash_root is not None and any(record.image is not None for record in records):
        settings["image_root"] = str(hash_root.resolve())

    def input_hash(record: PreferenceRecord) -> str:
        return record_input_hash(
            record, hash_root, extra={"text_prompt": record.meta.get("text_prompt")} if mode == "text" else None
        )

    config = {
        "command": "blind",
        "mode": mode,
        "data": file or f"<{len(records)} records in memory>",
        "image_root": None if root is None else str(root),
        "limit": limit,
        "output": str(out_path),
        "release_rows": None if write_release_rows is None else str(write_release_rows),
    }
    run = run_requests(
        engine,
        records,
        responses_path,
        build_request=lambda record: blind_request(record, mode, root, file=file),
        params=params,
        batch_size=batch_size,
        variant=f"blind-{mode}",
        config=config,
        config_path=config_path_for(out_path),
        progress_label=f"blind {mode}",
        input_hash=input_hash,
        settings=settings,
    )
    if run.failed:
        # The records file needs every answer: it is not written until a rerun answers these.
        ids = ", ".join(record.id for record in run.failed[:10]) + (", ..." if len(run.failed) > 10 else "")
        raise MmsafeError(
            f"{run.failure_line()} (ids: {ids}); {out_path} is not written until every record has a blind answer"
        )
    from mmsafe.generate.distributed import process_info

    if not process_info().is_main:
        return BlindSummary(out_path, responses_path, len(records), run.generated, run.already_done, [], run.seconds)

    answers = {
        response.id: response.response
        for response in read_response_records(responses_path)
        if response.variant == f"blind-{mode}"
    }
    if run.not_in_input:
        logger.info(
            "%s: %d blind answers for ids not in this input are kept there and not used",
            responses_path,
            len(run.not_in_input),
        )
    missing = [record.id for record in records if record.id not in answers]
    if missing:
        raise DataError(
            f"{len(missing)} records have no blind answer yet (first: {missing[0]}); rerun to finish",
            file=str(responses_path),
        )
    empty = [record.id for record in records if not answers[record.id].strip()]
    if empty:
        logger.warning(
            "%d blind answers are empty and were not added (first ids: %s)", len(empty), ", ".join(empty[:5])
        )
    output = [
        add_blind_response(record, answers[record.id]) if answers[record.id].strip() else record for record in records
    ]
    summary = BlindSummary(
        out_path, responses_path, len(records), run.generated, run.already_done, empty, time.perf_counter() - started
    )
    final = output
    sidecar_root: Path | None = None
    if (
        root is not None
        and any(record.image is not None for record in records)
        and root.resolve() != out_path.parent.resolve()
    ):
        rebased = rebase_images(output, root, out_path.parent) if image_root is None else None
        if rebased is not None:
            final, summary.images_rebased = rebased, True
        else:
            sidecar_root = summary.image_root = root
    if sidecar_root is None and image_root_sidecar_path(out_path).exists():
        sidecar_root = out_path.parent  # an earlier run's sidecar would name the wrong folder now
    if sidecar_root is not None:  # before the records: a records file is never without its root
        sidecar = write_image_root_sidecar(out_path, sidecar_root, written_by="mmsafe blind")
        summary.image_root_sidecar = sidecar if summary.image_root is not None else None
    write_records(out_path, final)
    if write_release_rows is not None:
        from mmsafe.data.formats import write_records as write_format

        summary.release_rows_path = Path(write_release_rows)
        summary.release_rows = write_format(write_release_rows, output, "mmsafe-po")
    return summary
