// Emulated build only: see nvshmem.h (the stand-in declares the nvshmemx_ names there too).
#pragma once

#include "nvshmem.h"
