import gc

from panopticond.addons.gcfreeze import GcFreeze


def test_running_freezes_the_heap():
    try:
        GcFreeze().running()
        assert gc.get_freeze_count() > 0
        assert gc.isenabled()  # cycles made later are still collected
    finally:
        gc.unfreeze()
