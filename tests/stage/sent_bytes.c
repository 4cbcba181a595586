/* For the stage tests: an MPI profiling (PMPI) wrapper, loaded with LD_PRELOAD into every rank, that counts
 * the bytes each process hands to MPI_Send and MPI_Isend (the ring's point-to-point traffic; collectives do
 * not pass through these calls) and writes the total to $AEGIS_TEST_SENT_DIR/<pid> at MPI_Finalize. It
 * counts independently of the stage tools' own accounting. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static unsigned long long sent;

static void count(int n, MPI_Datatype type)
{
    int size = 0;
    PMPI_Type_size(type, &size);
    sent += (unsigned long long)n * (unsigned long long)size;
}

int MPI_Send(const void *buf, int n, MPI_Datatype type, int dest, int tag, MPI_Comm comm)
{
    count(n, type);
    return PMPI_Send(buf, n, type, dest, tag, comm);
}

int MPI_Isend(const void *buf, int n, MPI_Datatype type, int dest, int tag, MPI_Comm comm, MPI_Request *req)
{
    count(n, type);
    return PMPI_Isend(buf, n, type, dest, tag, comm, req);
}

int MPI_Finalize(void)
{
    const char *dir = getenv("AEGIS_TEST_SENT_DIR");
    if (dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%d", dir, (int)getpid());
        FILE *f = fopen(path, "w");
        if (f) {
            fprintf(f, "%llu\n", sent);
            fclose(f);
        }
    }
    return PMPI_Finalize();
}
