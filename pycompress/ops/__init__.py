"""``pycompress.ops``: validated Python wrappers over the ``torch.ops.pycompress`` kernels.

Each family lives in its own module (``int8``, ``int8_conv``, ``int8_pool``, ``sparse``, ``kd``, ``semi24``); everything public is
re-exported here.
"""

from pycompress.ops import int8, int8_conv, int8_pool, kd, semi24, sparse
from pycompress.ops.int8 import *  # noqa: F401,F403
from pycompress.ops.int8_conv import *  # noqa: F401,F403
from pycompress.ops.int8_pool import *  # noqa: F401,F403
from pycompress.ops.kd import *  # noqa: F401,F403
from pycompress.ops.semi24 import *  # noqa: F401,F403
from pycompress.ops.sparse import *  # noqa: F401,F403

__all__ = list(int8.__all__) + list(int8_conv.__all__) + list(int8_pool.__all__) + list(sparse.__all__) + list(kd.__all__) + list(semi24.__all__)
