// The pod sandbox's process of the local cluster's pause image (scripts/build-node-images builds
// localhost/pause:3.10 from the binary scripts/build-tools makes of this module). No dependencies.
module github.com/sharedsync/sharedsync/tools/pause

go 1.26.0
