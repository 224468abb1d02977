"""The pytest plugin: parametrization, skips with reasons, the marker."""

pytest_plugins = ["pytester"]


def test_backend_fixture_runs_on_each_backend_and_skips_with_reason(pytester):
    pytester.makepyfile(
        """
        import streamkit as sk
        def test_backend(streamkit_backend):
            assert sk.get_backend() is streamkit_backend
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs", "-v")
    unavailable = [n for n in ("npu", "cuda") if n not in __import__("streamkit").available_backends()]
    result.assert_outcomes(passed=3 - len(unavailable), skipped=len(unavailable))
    result.stdout.fnmatch_lines(["*test_backend?fake? PASSED*"])
    for name in unavailable:
        result.stdout.fnmatch_lines([f"*{name} backend unavailable*"])


def test_marker_restricts_backends(pytester):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.streamkit_backends("fake")
        def test_only_fake(streamkit_backend):
            assert streamkit_backend.name == "fake"
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_marker_with_unknown_backend_is_an_error(pytester):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.streamkit_backends("tpu")
        def test_x(streamkit_backend):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*unknown backend*tpu*"])


def test_fake_session_fixture_raises_on_races(pytester):
    pytester.makepyfile(
        """
        import pytest, torch, streamkit as sk
        def test_race(fake_session):
            side = sk.Stream()
            x = torch.zeros(2, device=fake_session.device)
            with sk.switch(side):
                with pytest.raises(sk.RaceError):
                    x.add_(1)
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
