include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS bsk EXPORT BlackwellSparseKTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(DIRECTORY include/bsk DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT BlackwellSparseKTargets NAMESPACE BlackwellSparseK::
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/BlackwellSparseK)
configure_package_config_file(cmake/BlackwellSparseKConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/BlackwellSparseKConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/BlackwellSparseK)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/BlackwellSparseKConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES
  ${CMAKE_CURRENT_BINARY_DIR}/BlackwellSparseKConfig.cmake
  ${CMAKE_CURRENT_BINARY_DIR}/BlackwellSparseKConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/BlackwellSparseK)
