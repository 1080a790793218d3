"""DICOM input: the display pipeline, one preprocessing recipe for every format, and DICOM
archives scored through the real pipeline (SeaweedFS + Ray + onnxruntime)."""

import io

import numpy as np
import pytest
from PIL import Image

from covidray.imaging.dicom import is_dicom, read_dicom
from covidray.imaging.pixels import DecodeError
from covidray.imaging.recipe import preprocess
from covidray.layout import RunLayout, ScoreLayout


def xray_values(seed: int = 0, shape=(300, 260), bits: int = 12) -> np.ndarray:
    """A smooth 12-bit X-ray-like image (integers in 0 .. 2**bits - 1)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    body = np.exp(-(((x - shape[1] / 2) / (shape[1] / 3)) ** 2))
    lungs = np.exp(-(((x - shape[1] * 0.3) / 25) ** 2 + ((y - shape[0] / 2) / 70) ** 2)) \
        + np.exp(-(((x - shape[1] * 0.7) / 25) ** 2 + ((y - shape[0] / 2) / 70) ** 2))
    image = 0.2 + 0.6 * body - 0.4 * lungs + 0.02 * rng.standard_normal(shape)
    top = 2 ** bits - 1
    return np.clip(np.round(image * top), 0, top).astype(np.uint16)


def make_dicom(stored: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12,
               intercept: float | None = None, slope: float | None = None,
               window: tuple[float, float] | None = None, view: str | None = "PA",
               syntax=None, pixels: bool = True, uid: str = "1.2.826.0.1.3680043.8.498.1") -> bytes:
    """A DICOM Part 10 file (DX), built with pydicom as a modality would write it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray, presentation
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, uid
    ds.StudyInstanceUID = uid + ".1"
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName = "SECRET-PATIENT-42", "Doe^Jane"
    ds.Modality, ds.Manufacturer = "DX", "Acme Medical"
    if view is not None:
        ds.ViewPosition = view
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if intercept is not None:
        ds.RescaleIntercept, ds.RescaleSlope = intercept, 1 if slope is None else slope
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixels:
        ds.PixelData = stored.astype(np.uint16).tobytes()
    if syntax is not None:
        ds.compress(syntax, stored.astype(np.uint16), generate_instance_uid=False)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png16(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_same_image_as_monochrome1_and_2_dicom_and_16_bit_png_is_the_same_model_input():
    from pydicom.uid import JPEG2000Lossless

    values = xray_values()
    as_png = preprocess(png16(values))
    variants = {
        "MONOCHROME2": make_dicom(values),
        "MONOCHROME2 rescaled": make_dicom(values, intercept=-1024),
        "MONOCHROME1": make_dicom(4095 - values, photometric="MONOCHROME1"),
        "MONOCHROME2 JPEG 2000": make_dicom(values, syntax=JPEG2000Lossless),
    }
    for name, data in variants.items():
        assert is_dicom(data)
        np.testing.assert_array_equal(preprocess(data), as_png, err_msg=name)
    inverted = preprocess(make_dicom(4095 - values))  # MONOCHROME2 of inverted values
    assert not np.array_equal(inverted, as_png)  # the photometric tag is what made them equal


def test_bits_above_bits_stored_are_ignored():
    import pydicom

    values = xray_values()
    clean = make_dicom(values)  # BitsStored 12
    dataset = pydicom.dcmread(io.BytesIO(clean))
    dataset.PixelData = (values | 0xF000).astype(np.uint16).tobytes()  # overlay bits set
    noisy = io.BytesIO()
    dataset.save_as(noisy)
    np.testing.assert_array_equal(preprocess(noisy.getvalue()), preprocess(clean))


def test_window_centre_and_width_set_the_grey_scale():
    values = np.full((256, 256), 100, dtype=np.uint16)
    values[:, 128:] = 3000
    values[100:150, :] = 1000  # the window's centre: mid-grey
    image, _ = read_dicom(make_dicom(values, window=(1000, 401)))
    pixels = np.asarray(image)
    assert pixels[0, 0] == 0 and pixels[0, 255] == 255  # below / above the window
    assert abs(int(pixels[120, 10]) - 128) <= 1
    # MONOCHROME1 of the inverted values, with the window on them: the same picture (to one
    # grey level: DICOM's linear window is centred on c - 0.5, so it is not mirror-exact).
    image, _ = read_dicom(make_dicom(4095 - values, photometric="MONOCHROME1",
                                     window=(4095 - 1000, 401)))
    assert np.abs(np.asarray(image).astype(int) - pixels).max() <= 1


def test_tags_are_read_and_patient_identity_is_not():
    _, tags = read_dicom(make_dicom(xray_values(), view="AP", uid="1.2.3.4"))
    assert tags == {"study_uid": "1.2.3.4.1", "sop_uid": "1.2.3.4", "view_position": "AP",
                    "modality": "DX", "manufacturer": "Acme Medical",
                    "bit_depth": 12, "photometric": "MONOCHROME2"}  # for the drift profile
    assert "SECRET-PATIENT-42" not in repr(tags)


@pytest.mark.parametrize("build, reason", [
    (lambda v: make_dicom(v, pixels=False), "no pixel data"),
    (lambda v: make_dicom(v, photometric="RGB"), "unsupported DICOM photometric interpretation 'RGB'"),
    (lambda v: make_dicom(v)[:600], "DICOM"),  # truncated in the pixel data
    (lambda v: make_dicom(np.zeros((8, 4000), np.uint16)), "aspect ratio"),
])
def test_unusable_dicom_files_fail_with_their_reason(build, reason):
    with pytest.raises(DecodeError, match=reason):
        preprocess(build(xray_values()))


def test_a_dicom_archive_is_scored_with_uids_views_and_reasons(storage, trained_run, prefix,
                                                                ray_local):
    from pydicom.uid import JPEG2000Lossless

    from covidray.stages.score import ScoreConfig, score_archive

    values = xray_values(1)
    archive = f"{prefix}/archive"
    files = {
        "m1.dcm": make_dicom(4095 - values, photometric="MONOCHROME1", uid="1.2.3.1"),
        "m2-rescaled.dcm": make_dicom(values, intercept=-1024, uid="1.2.3.2"),
        "windowed.dcm": make_dicom(values, window=(2000, 3000), uid="1.2.3.3"),
        "j2k.dcm": make_dicom(values, syntax=JPEG2000Lossless, uid="1.2.3.4"),
        "untagged-view.dcm": make_dicom(values, view=None, uid="1.2.3.5"),
        "lateral.dcm": make_dicom(values, view="LL", uid="1.2.3.6"),
        "no-pixels.dcm": make_dicom(values, pixels=False, uid="1.2.3.7"),
        "colour.dcm": make_dicom(values, photometric="PALETTE COLOR", uid="1.2.3.8"),
    }
    for name, data in files.items():
        storage.write_bytes(f"{archive}/{name}", data)
    model = RunLayout(trained_run["run"]).onnx
    summary = score_archive(ScoreConfig(archive, model, f"{prefix}/out", batch_size=4), storage)
    assert (summary["listed"], summary["scored"], summary["failed"]) == (8, 5, 3)

    layout = ScoreLayout(f"{prefix}/out")
    predictions = storage.read_parquet_dir(layout.predictions).set_index("uri")
    assert sorted(predictions["sop_uid"]) == ["1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4", "1.2.3.5"]
    assert set(predictions["study_uid"]) == {f"1.2.3.{i}.1" for i in range(1, 6)}
    assert predictions.loc[f"{archive}/m1.dcm", "view_position"] == "PA"
    assert set(predictions["manufacturer"]) == {"Acme Medical"}
    # The same pixels as MONOCHROME1 and as rescaled / compressed MONOCHROME2: the same score.
    same = predictions.loc[[f"{archive}/{n}" for n in ("m1.dcm", "m2-rescaled.dcm", "j2k.dcm")],
                           "score"]
    assert same.max() - same.min() < 1e-6
    errors = storage.read_parquet_dir(layout.errors).set_index("uri")
    assert "lateral view (ViewPosition LL) skipped" in errors.loc[f"{archive}/lateral.dcm", "error"]
    assert errors.loc[f"{archive}/lateral.dcm", "sop_uid"] == "1.2.3.6"
    assert "no pixel data" in errors.loc[f"{archive}/no-pixels.dcm", "error"]
    assert "PALETTE COLOR" in errors.loc[f"{archive}/colour.dcm", "error"]
    for table in (predictions, errors):
        assert not table.astype(str).apply(lambda c: c.str.contains("SECRET-PATIENT")).any().any()

    # --views all: the lateral view is scored, and says what it is.
    summary = score_archive(ScoreConfig(archive, model, f"{prefix}/all", batch_size=4,
                                        views="all"), storage)
    assert summary["scored"] == 6
    everything = storage.read_parquet_dir(ScoreLayout(f"{prefix}/all").predictions)
    lateral = everything.set_index("uri").loc[f"{archive}/lateral.dcm"]
    assert lateral["view_check"] == "lateral view (ViewPosition LL)"
