{{/* Chart name, truncated to the 63 characters a Kubernetes name allows. */}}
{{- define "forkrl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped full name; leaves room for the suffixes KubeRay adds ("-head-svc"). */}}
{{- define "forkrl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "forkrl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "forkrl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "forkrl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "forkrl.labels" -}}
helm.sh/chart: {{ include "forkrl.chart" . }}
{{ include "forkrl.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: forkrl
{{- end -}}

{{- define "forkrl.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "forkrl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "forkrl.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The RayCluster's name; KubeRay names its head Service "<name>-head-svc". */}}
{{- define "forkrl.rayClusterName" -}}
{{- printf "%s-ray" (include "forkrl.fullname" .) -}}
{{- end -}}

{{/* The Ray dashboard (Jobs API) address the control plane submits to. */}}
{{- define "forkrl.rayAddress" -}}
{{- if .Values.controlPlane.rayAddress -}}
{{- .Values.controlPlane.rayAddress -}}
{{- else -}}
{{- printf "http://%s-head-svc.%s.svc:8265" (include "forkrl.rayClusterName" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* The URL training drivers push metrics to. */}}
{{- define "forkrl.publicUrl" -}}
{{- if .Values.controlPlane.publicUrl -}}
{{- .Values.controlPlane.publicUrl -}}
{{- else -}}
{{- printf "http://%s.%s.svc:%d" (include "forkrl.fullname" .) .Release.Namespace (int .Values.controlPlane.service.port) -}}
{{- end -}}
{{- end -}}

{{- define "forkrl.runsClaim" -}}
{{- default (printf "%s-runs" (include "forkrl.fullname" .)) .Values.runStorage.existingClaim -}}
{{- end -}}

{{/* A volume named "runs" for the Ray pods: the shared claim, or an emptyDir. */}}
{{- define "forkrl.runsVolume" -}}
- name: runs
{{- if .Values.runStorage.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "forkrl.runsClaim" . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{/*
One Ray worker group. Call with (dict "root" $ "name" "rollout" "resource" "forkrl_rollout" "group" .Values.rolloutWorkers).
*/}}
{{- define "forkrl.workerGroup" -}}
{{- $root := .root -}}
{{- $g := .group -}}
- groupName: {{ .name }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ default $g.replicas $g.minReplicas }}
  maxReplicas: {{ max (default $g.replicas $g.maxReplicas) $g.replicas }}
  rayStartParams:
    {{- range $k, $v := $g.rayStartParams }}
    {{ $k }}: {{ $v | quote }}
    {{- end }}
    {{- if not (hasKey $g.rayStartParams "resources") }}
    resources: {{ printf "'{\"%s\": 1000}'" .resource | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "forkrl.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .name }}-workers
        {{- include "forkrl.rayPodLabel" $root | nindent 8 }}
        {{- with $g.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $g.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "forkrl.serviceAccountName" $root }}
      automountServiceAccountToken: false  # tenants' code runs here: no Kubernetes API token
      {{- with $g.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with $g.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with $root.Values.image.pullSecrets }}
      imagePullSecrets:
        {{- range . }}
        - name: {{ . }}
        {{- end }}
      {{- end }}
      {{- with $g.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "forkrl.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          workingDir: /opt/forkrl
          env:
            - name: FORKRL_POOL
              value: {{ .name }}
            {{- include "forkrl.rayAuthEnv" $root | nindent 12 }}
            {{- with $g.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- with $g.envFrom }}
          envFrom:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          resources:
            {{- toYaml $g.resources | nindent 12 }}
          volumeMounts:
            - name: runs
              mountPath: /var/lib/forkrl/runs
            - name: shm
              mountPath: /dev/shm
            {{- with $g.volumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        {{- include "forkrl.runsVolume" $root | nindent 8 }}
        - name: shm
          emptyDir:
            medium: Memory
        {{- with $g.volumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end -}}

{{/* Ray token authentication env for every Ray container (ray.auth). */}}
{{/* The label of every Ray pod of this release: the standing RayCluster's, or every job's own cluster
with controlPlane.admission=kueue (the NetworkPolicies select by it). */}}
{{- define "forkrl.rayPodLabel" -}}
forkrl.io/ray: {{ include "forkrl.fullname" . }}
{{- end -}}

{{- define "forkrl.rayAuthEnv" -}}
{{- if .Values.ray.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.ray.auth.tokenSecret.name }}
      key: {{ .Values.ray.auth.tokenSecret.key }}
{{- end }}
{{- end -}}
