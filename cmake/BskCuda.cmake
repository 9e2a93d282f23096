# bsk_set_cuda_archs(target "80;90a"): SASS for each arch, plus PTX for the newest generic arch
# (an "a" arch's PTX cannot be JIT-compiled for a later GPU, so 90a contributes compute_90 PTX).
# Written as explicit -gencode flags: the -arch=sm_90a shorthand also runs a plain sm_90 pass.
function(bsk_set_cuda_archs target archs)
  set(flags "")
  set(newest 0)
  foreach(arch IN LISTS archs)
    string(REGEX MATCH "^[0-9]+" num "${arch}")
    if(num STREQUAL "")
      message(FATAL_ERROR "BSK_CUDA_ARCHS: '${arch}' is not an arch like 80 or 90a")
    endif()
    list(APPEND flags "-gencode=arch=compute_${arch},code=sm_${arch}")
    if(num GREATER newest)
      set(newest ${num})
    endif()
  endforeach()
  list(APPEND flags "-gencode=arch=compute_${newest},code=compute_${newest}")
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${flags}>)
endfunction()
