// Umbrella header for libbsk.
#pragma once

#include "bsk/attention.h"
#include "bsk/error.h"
#include "bsk/reference.h"
#include "bsk/sparsek.h"
#include "bsk/sparsek_cache.h"
#include "bsk/tensor.h"
#include "bsk/version.h"
