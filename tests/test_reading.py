"""Reading what archives hold: DICOM with damaged headers, deep and odd images, odd file names — one line per problem."""
import io, json, os, struct, zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boneage.dicom_files import write_dicom
from boneage.phantom import phantom_radiograph
from boneage.reading import (ImageError, display_name, read_array, read_bytes, read_image, robust_window, to_uint8_gray,
                             window_to_uint8)

HAND = phantom_radiograph(120, True, 200, seed=2)[0]


def corr(a, b): return np.corrcoef(np.asarray(a, float).ravel(), np.asarray(b, float).ravel())[0, 1]


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize("rescale", [False, True])
def test_dicom_variants_read_as_the_image(tmp_path, photometric, bits, rescale):
    scale = (2 ** bits - 1) // 255
    stored = HAND.astype(np.uint32) * scale
    if photometric == "MONOCHROME1": stored = (2 ** bits - 1) - stored  # bright bone stored low
    tags = {"RescaleSlope": 3, "RescaleIntercept": -1024} if rescale else {}
    r = read_image(write_dicom(tmp_path / "x.dcm", stored, photometric, bits, sex="M", **tags))
    assert r.sex is True and r.pixels.dtype == np.uint8 and r.pixels.shape == HAND.shape and r.format == "DICOM"
    assert corr(r.pixels, HAND) > 0.99 and r.notes == []


def test_dicom_window_clips_to_the_window(tmp_path):
    stored = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (8, 1))  # a ramp 0..4080
    r = read_image(write_dicom(tmp_path / "w.dcm", stored, WindowCenter=2048, WindowWidth=1024, sex="F"))
    row = r.pixels[0]
    assert r.sex is False and row[stored[0] < 1536].max() == 0 and row[stored[0] > 2560].min() == 255
    inside = (stored[0] > 1600) & (stored[0] < 2500)
    assert np.all(np.diff(row[inside].astype(int)) >= 0) and row[inside].min() > 0 and row[inside].max() < 255


def _dicom(tmp_path, **tags):
    return write_dicom(tmp_path / "d.dcm", HAND.astype(np.uint16) * 16, **tags)


@pytest.mark.parametrize("tags,note", [
    ({"WindowCenter": 2000, "WindowWidth": 0}, "window unusable"),
    ({"WindowCenter": 2000, "WindowWidth": -40}, "window unusable"),
    ({"WindowCenter": 2000, "WindowWidth": 500, "VOILUTFunction": "CUBIC"}, "window unusable"),
    ({"RescaleSlope": "", "RescaleIntercept": "0"}, None),
    ({"WindowCenter": 2000}, "window unusable (a centre without a width"),  # real hands came in like these
    ({"WindowCenter": 2000, "WindowWidth": ""}, "window unusable (a centre without a width"),
])
def test_damaged_dicom_headers_fall_back_and_say_so(tmp_path, tags, note):
    r = read_image(_dicom(tmp_path, **tags))
    assert r.pixels.shape == HAND.shape and corr(r.pixels, HAND) > 0.99
    if note: assert any(note in n for n in r.notes)


def test_broken_lut_sequences_fall_back(tmp_path):
    import pydicom
    from pydicom.dataset import Dataset
    path = _dicom(tmp_path)
    ds = pydicom.dcmread(path)
    bad = Dataset(); bad.LUTDescriptor = [3, 0]; bad.LUTData = b"\x01"  # a descriptor with too few values
    ds.VOILUTSequence = [bad]
    ds.ModalityLUTSequence = [bad]
    ds.save_as(path)
    r = read_image(path)
    assert corr(r.pixels, HAND) > 0.99 and any("modality LUT unusable" in n for n in r.notes) \
        and any("window unusable" in n for n in r.notes)


def test_dicom_without_size_or_pixels_or_decoder(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate
    path = _dicom(tmp_path)
    ds = pydicom.dcmread(path); ds.Rows = None; ds.save_as(tmp_path / "norows.dcm")
    with pytest.raises(ImageError, match="norows.dcm: DICOM with no image size"): read_image(tmp_path / "norows.dcm")
    ds = pydicom.dcmread(path); del ds.PixelData; ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(ImageError, match="nopixels.dcm: DICOM without pixel data"): read_image(tmp_path / "nopixels.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60]); ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    with pytest.raises(ImageError, match=r"j2k.dcm: its JPEG 2000 .*pixel data cannot be decoded \(damaged"): read_image(tmp_path / "j2k.dcm")
    (tmp_path / "fake.dcm").write_text("not dicom")
    with pytest.raises(ImageError, match="fake.dcm: "): read_image(tmp_path / "fake.dcm")


def test_multiframe_dicom_decodes_one_frame_within_the_limit(tmp_path, monkeypatch):
    import pydicom
    frames = np.stack([HAND.astype(np.uint16) * 16 + k for k in range(100)])
    path = write_dicom(tmp_path / "cine.dcm", frames[0])
    ds = pydicom.dcmread(path); ds.NumberOfFrames = 100; ds.PixelData = frames.tobytes(); ds.save_as(path)
    r = read_image(path, max_pixels=HAND.size)  # one frame fits the limit; a hundred would not
    assert r.pages == 100 and r.pixels.shape == HAND.shape and "read frame 1" in r.notes[0]
    with pytest.raises(ImageError, match="over the limit"): read_image(path, max_pixels=HAND.size - 1)


def test_pydicom_test_files_read_or_fail_in_one_line():
    import pydicom
    files = sorted((Path(pydicom.__file__).parent / "data" / "test_files").rglob("*.dcm"))
    assert len(files) > 50
    read = failed = 0
    for f in files:
        try: read_image(f); read += 1
        except ImageError as e:
            assert "\n" not in str(e) and str(e).startswith(str(f)); failed += 1
    assert read > 20 and read + failed == len(files)  # no other exception escaped


def _bomb_png(path, width, height):
    "A tiny PNG whose header claims width × height pixels (valid header checksum, nonsense data)."
    buf = io.BytesIO(); Image.fromarray(np.zeros((1, 1), np.uint8)).save(buf, "PNG"); png = buf.getvalue()
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    path.write_bytes(png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:])
    return path


def test_pixel_limits_are_checked_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a decompression bomb"))
    with pytest.raises(ImageError, match="bomb.png: .*over the limit.*refused before decoding"):
        read_image(_bomb_png(tmp_path / "bomb.png", 100_000, 100_000))
    with pytest.raises(ImageError, match="small.png: 300×300 pixels is over the limit of 1,000"):
        read_image(_bomb_png(tmp_path / "small.png", 300, 300), max_pixels=1000)


@pytest.mark.parametrize("name,content,reason", [
    ("empty.png", b"", "empty file"), ("text.png", b"this is not an image", "not a PNG, JPEG, TIFF or DICOM image"),
    ("hdr.png", b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 8000 +X 8000\n" + b"\0" * 64, "not a PNG, JPEG, TIFF or DICOM image"),
    ("a.gif", "GIF", "a GIF image; boneage reads PNG, JPEG, TIFF and DICOM")])
def test_what_is_not_a_radiograph_file(tmp_path, name, content, reason):
    if content == "GIF": Image.fromarray(HAND).save(tmp_path / name, "GIF")
    else: (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError, match=f"{name}: {reason}"):
        read_image(tmp_path / name)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_truncated_files_are_refused(tmp_path, fmt):
    buf = io.BytesIO(); Image.fromarray(HAND).save(buf, fmt); data = buf.getvalue()
    (tmp_path / "cut").write_bytes(data[:int(len(data) * 0.6)])
    with pytest.raises(ImageError, match="cut: (truncated|damaged)"):
        read_image(tmp_path / "cut")


def test_exif_orientation_is_applied(tmp_path):
    sideways = Image.fromarray(np.rot90(HAND, 1).copy())
    exif = sideways.getexif(); exif[0x0112] = 6  # "rotate 90° clockwise to view"
    sideways.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    r = read_image(tmp_path / "phone.jpg")
    assert r.pixels.shape == HAND.shape and np.abs(r.pixels.astype(int) - HAND).mean() < 2
    assert r.notes == ["EXIF orientation 6 applied"]


def test_grey_png_with_exif_is_turned_and_without_it_reads_as_pillow_decodes_it(tmp_path, monkeypatch, capfd):
    "A grey PNG goes to OpenCV only without EXIF (an eXIf chunk after the pixels included); the pixels match Pillow's."
    from boneage import reading
    sideways = Image.fromarray(np.rot90(HAND, 1).copy())
    exif = sideways.getexif(); exif[0x0112] = 6
    sideways.save(tmp_path / "phone.png", exif=exif)
    assert b"eXIf" in (tmp_path / "phone.png").read_bytes()
    r = read_image(tmp_path / "phone.png")
    assert np.array_equal(r.pixels, HAND) and r.notes == ["EXIF orientation 6 applied"]
    for arr, name in [(HAND, "8.png"), (HAND.astype(np.uint16) * 257, "16.png")]:
        Image.fromarray(arr).save(tmp_path / name)
        by_opencv = read_image(tmp_path / name)
        monkeypatch.setattr(reading, "_opencv_grey_png", lambda data, im: None)  # Pillow alone
        by_pillow = read_image(tmp_path / name)
        monkeypatch.undo()
        assert np.array_equal(by_opencv.pixels, by_pillow.pixels) and by_opencv.notes == by_pillow.notes, name
        assert reading._opencv_grey_png((tmp_path / name).read_bytes(), Image.open(tmp_path / name)) is not None, name
    damaged = bytearray((tmp_path / "8.png").read_bytes()); damaged[len(damaged) // 2] ^= 0xFF  # a checksum now wrong
    (tmp_path / "damaged.png").write_bytes(damaged)
    assert not reading._plain_png(bytes(damaged)) and reading._plain_png((tmp_path / "8.png").read_bytes())
    try: read_image(tmp_path / "damaged.png")
    except ImageError: pass
    assert "libpng" not in capfd.readouterr().err  # Pillow, not OpenCV, met the damage: nothing printed beside our message


def test_multipage_tiff_reads_the_largest_page(tmp_path):
    Image.fromarray(HAND[::8, ::8]).save(tmp_path / "scan.tif", save_all=True, append_images=[Image.fromarray(HAND)])
    r = read_image(tmp_path / "scan.tif")
    assert r.pixels.shape == HAND.shape and r.pages == 2 and "read page 2, the largest" in r.notes[0]
    assert np.array_equal(r.pixels, HAND)


def test_sixteen_bit_window_ignores_a_saturated_marker(tmp_path):
    twelve = HAND.astype(np.uint16) * 16
    marked = twelve.copy(); marked[:4, :4] = 65535
    for name, img in (("plain.png", twelve), ("marked.png", marked)): Image.fromarray(img).save(tmp_path / name)
    a, b = read_image(tmp_path / "plain.png").pixels, read_image(tmp_path / "marked.png").pixels
    assert np.abs(a[4:].astype(int) - b[4:]).max() <= 1  # the marker does not squash the hand
    assert a.max() == 255 and corr(a, HAND) > 0.99
    assert window_to_uint8(marked, *robust_window(marked))[10:].std() > 40


def test_colour_grey_and_alpha_images(tmp_path):
    Image.fromarray(np.dstack([HAND] * 3)).save(tmp_path / "grey_rgb.png")
    r = read_image(tmp_path / "grey_rgb.png")
    assert np.array_equal(r.pixels, HAND) and r.colourfulness == 0
    rgba = np.dstack([HAND] * 3 + [np.full_like(HAND, 255)]); rgba[:100, :, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png").pixels
    assert out[:100].max() == 0 and np.array_equal(out[100:], HAND[100:])  # transparent reads as background
    photo = np.dstack([HAND, HAND // 2, np.zeros_like(HAND)])
    assert read_array(photo).colourfulness > 20
    assert to_uint8_gray(np.zeros((4, 4), np.uint16)).max() == 0  # a blank deep image does not divide by zero


def test_file_names_that_are_not_utf8(tmp_path):
    raw = os.fsencode(tmp_path) + b"/r\xf6ntgen.png"  # Latin-1 from an old archive
    with open(raw, "wb") as f: Image.fromarray(HAND).save(f, "PNG")
    path = Path(os.fsdecode(raw))
    r = read_image(path)
    assert np.array_equal(r.pixels, HAND) and os.fsencode(r.source) == raw  # the path as given: the row matches the file
    assert json.loads(json.dumps(r.source)) == r.source  # JSON keeps the undecodable bytes as surrogate escapes
    assert display_name(r.source).endswith("r\ufffdntgen.png")  # printed, they show as �


def test_unreadable_file_is_one_line(tmp_path, monkeypatch):
    Image.fromarray(HAND).save(tmp_path / "locked.png")
    monkeypatch.setattr(os, "open", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(ImageError, match=r"locked.png: cannot read it \(permission denied\)"):
        read_image(tmp_path / "locked.png")
    with pytest.raises(ImageError, match="missing.png: file not found"):
        monkeypatch.undo(); read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="a folder, not an image file"):
        read_image(tmp_path)


@pytest.mark.parametrize("arr,reason", [(np.zeros((0, 5)), "empty array"), (np.zeros((2, 8, 8, 3)), "is not an image"),
                                        (np.full((8, 8), np.nan), "NaN"), (np.ones((8, 8), bool), "bool array is not an image"),
                                        (np.zeros((8, 8, 2)), "is not an image"), (np.array([["a"]]), "is not an image")])
def test_arrays_that_are_not_images(arr, reason):
    with pytest.raises(ImageError, match=reason):
        read_array(arr)


def test_real_radiographs_in_every_format_read_alike(rsna_sample, tmp_path):
    "The 40 RSNA radiographs as 8-bit PNG, JPEG, 16-bit PNG, 16-bit TIFF and 12-bit DICOM: the same picture each time."
    for p in sorted((rsna_sample / "images").glob("*.png"))[:40:4]:
        img = read_image(p).pixels
        Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
        Image.fromarray(img.astype(np.uint16) * 257).save(tmp_path / "a16.png")
        Image.fromarray(img.astype(np.uint16) * 257).save(tmp_path / "a16.tif")
        write_dicom(tmp_path / "a.dcm", img.astype(np.uint16) * 16)
        for f in ("a.jpg", "a16.png", "a16.tif", "a.dcm"):
            assert corr(read_image(tmp_path / f).pixels, img) > 0.98, (p.name, f)


# The EXIF orientations as the standard defines them (what the reader did by hand before it used Pillow's exif_transpose):
# the operation that turns the stored pixels into the picture a viewer shows.
EXIF_TURNS = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
              5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.rot90(a, 3), 7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
              8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_every_exif_orientation_gives_the_pixels_the_standard_defines(tmp_path, mode):
    "Pillow's `exif_transpose` turns each of the eight orientations exactly as the table above: same pixels, lossless PNG."
    from PIL import Image
    stored = np.random.default_rng(0).integers(0, 256, (30, 20), dtype=np.uint8)  # not square: a wrong turn changes the shape
    for orientation, turn in EXIF_TURNS.items():
        im = Image.fromarray(stored).convert(mode)
        exif = im.getexif(); exif[0x0112] = orientation
        im.save(tmp_path / f"o{orientation}.png", exif=exif)
        r = read_image(tmp_path / f"o{orientation}.png")
        np.testing.assert_array_equal(r.pixels, turn(stored), err_msg=f"orientation {orientation}")
        assert (f"EXIF orientation {orientation} applied" in r.notes) == (orientation != 1)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_only_regular_files_are_read_and_never_past_the_limit(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    os.symlink("/dev/zero", tmp_path / "zero.png")
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    for name, reason in (("pipe.png", "a named pipe \\(FIFO\\), not a regular file"), ("zero.png", "a character device, not a regular file"),
                         ("loop.png", "cannot read it \\(Too many levels of symbolic links\\)")):
        with pytest.raises(ImageError, match=f"{name}: {reason}"): read_image(tmp_path / name)
    with pytest.raises(ImageError, match=r"^a\\x00b\.png: not a usable file name"): read_image("a\0b.png")  # the NUL escaped: one printable line
    Image.fromarray(HAND).save(tmp_path / "hand.png")
    with pytest.raises(ImageError, match="hand.png: over the limit of 0 MiB for one radiograph; not read"):
        read_bytes(tmp_path / "hand.png", max_bytes=100)


def test_a_file_is_read_as_what_its_bytes_are(tmp_path):
    Image.fromarray(HAND).save(tmp_path / "png.dcm", "PNG")
    r = read_image(tmp_path / "png.dcm")
    assert r.format == "PNG" and np.array_equal(r.pixels, HAND) and "named .dcm but holds a PNG image" in r.notes[-1]
    path = _dicom(tmp_path)
    (tmp_path / "cut.dcm").write_bytes(path.read_bytes()[:-5000])  # uncompressed, cut short
    with pytest.raises(ImageError, match="cut.dcm: its pixel data is damaged or cut short"): read_image(tmp_path / "cut.dcm")


def test_a_deflated_dicom_is_held_to_the_byte_limit(tmp_path, monkeypatch):
    "500 frames of 1024² deflate to about a megabyte and would inflate to 1 GB: refused before pydicom inflates them."
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    path = write_dicom(tmp_path / "cine.dcm", np.zeros((1024, 1024), np.uint16))
    ds = pydicom.dcmread(path); ds.NumberOfFrames = 500; ds.PixelData = bytes(500 * 1024 * 1024 * 2)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "bomb.dcm", enforce_file_format=True)
    assert (tmp_path / "bomb.dcm").stat().st_size < 3 * 2**20
    with pytest.raises(ImageError, match="bomb.dcm: a deflated DICOM that inflates to over 256 MiB; not read"):
        read_image(tmp_path / "bomb.dcm")
    small = pydicom.dcmread(path); small.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    small.PixelData = (HAND.astype(np.uint16) * 16).tobytes(); small.Rows, small.Columns = HAND.shape
    small.save_as(tmp_path / "small.dcm", enforce_file_format=True)
    assert corr(read_image(tmp_path / "small.dcm").pixels, HAND) > 0.99  # a deflated hand within the limit reads
