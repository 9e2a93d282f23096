# CuTe/CUTLASS headers come from the pinned nvidia-cutlass pip package, which ships them under
# cutlass_library/source/include (located without importing the package, whose imports need
# more packages). BSK_CUTLASS_INCLUDE_DIR overrides the lookup.
if(NOT BSK_CUTLASS_INCLUDE_DIR)
  find_package(Python3 COMPONENTS Interpreter REQUIRED)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
      "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source', 'include'))"
    OUTPUT_VARIABLE _bsk_cutlass_inc OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _bsk_cutlass_rc ERROR_QUIET)
  if(_bsk_cutlass_rc EQUAL 0)
    set(BSK_CUTLASS_INCLUDE_DIR "${_bsk_cutlass_inc}" CACHE PATH "" FORCE)
  endif()
endif()
if(NOT EXISTS "${BSK_CUTLASS_INCLUDE_DIR}/cute/tensor.hpp")
  message(FATAL_ERROR
    "CuTe headers not found (looked in '${BSK_CUTLASS_INCLUDE_DIR}'). "
    "Install them with: python3 -m pip install nvidia-cutlass==4.2.0.0 "
    "or pass -DBSK_CUTLASS_INCLUDE_DIR=<dir containing cute/>")
endif()
message(STATUS "BlackwellSparseK: CuTe headers from ${BSK_CUTLASS_INCLUDE_DIR}")
