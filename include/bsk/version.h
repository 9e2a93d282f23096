#pragma once

#define BSK_VERSION_MAJOR 0
#define BSK_VERSION_MINOR 1
#define BSK_VERSION_PATCH 0
#define BSK_VERSION "0.1.0"
